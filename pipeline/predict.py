"""Predict any images with a finished run's model: ``python pipeline/predict.py RUN_DIR --images PATH... --out OUT``.

PATH is an image file or a folder (searched recursively for .png, .jpg, .jpeg, .bmp, .tif, .tiff, .webp).
Any size (the network pads its input to a multiple of 32 and crops the prediction back; images with a
side over ``--max-side`` are scaled down for the network and the prediction scaled back to the image's
size), any mode (grayscale, RGBA, palette, 16-bit grey: read as 8-bit RGB by
``divdr.data.cityscapes.read_rgb``). For each image, under OUT (the image's name, or its path inside a
folder given):

- ``<name>_prediction.png``: the colourised prediction (Cityscapes colours) blended over the image;
- ``<name>_labelIds.png``: the prediction in Cityscapes labelIds;
- ``<name>_route.png``: the route the image took (DR's routing diagram, line width = gate weight),
  its real GFLOPs and its nearest cluster;

and ``OUT/predictions.parquet``: image, height, width, gflops, gflops_1024x2048, cluster, distance (to
the run's nearest centre) and the files written. A file that cannot be read as an image is named on
stderr, the others are still predicted, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from divdr.data.cityscapes import normalize_image, read_rgb
from divdr.data.errors import DatasetError
from divdr.data.labels import colourise, train_ids_to_label_ids
from divdr.evaluation import REFERENCE_SIZE
from divdr.flops import CostTable, cost_table, real_cost
from divdr.heads import DynamicRoutingSegmenter
from pipeline.route_diagram import routes_figure
from pipeline.trained_run import RunDirError, TrainedRun, load_run, nearest_centre

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PREDICTIONS_FILE = "predictions.parquet"
DEFAULT_ALPHA = 0.5  # the prediction's share of each pixel of the blend
DEFAULT_MAX_SIDE = 2048  # Cityscapes' width: larger images are scaled down for the network
REFERENCE_COLUMN = f"gflops_{REFERENCE_SIZE[0]}x{REFERENCE_SIZE[1]}"
DESCRIPTION = ("Predict any images with a finished segmentation run's model: for each a blended prediction, "
               "the route it took, its real GFLOPs and nearest cluster; one row each in predictions.parquet.")
SCHEMA = pa.schema([("image", pa.string()), ("height", pa.int64()), ("width", pa.int64()),
                    ("gflops", pa.float64()), (REFERENCE_COLUMN, pa.float64()), ("cluster", pa.int64()),
                    ("distance", pa.float64()), ("network_height", pa.int64()), ("network_width", pa.int64()),
                    ("prediction", pa.string()), ("label_ids", pa.string()), ("route", pa.string())])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline/predict.py", description=DESCRIPTION)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished segmentation run's folder")
    parser.add_argument("--images", type=Path, nargs="+", required=True, metavar="PATH",
                        help="image files or folders (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; files are overwritten)")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help=f"opacity of the prediction over the image, 0-1 (default {DEFAULT_ALPHA})")
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, metavar="N",
                        help="images with a longer side are scaled down to it for the network, the prediction "
                             f"scaled back (default {DEFAULT_MAX_SIDE}; 0 = never)")
    return parser


@dataclass(frozen=True)
class ImageJob:
    path: Path
    name: str  # output name under OUT, without extension (POSIX separators)


def collect_images(paths: list[Path]) -> tuple[list[ImageJob], list[str]]:
    """The images to predict, and an error for each path that does not exist or is an empty folder.
    A file given by name is always tried (a bad one fails when read); in a folder only files with an
    image extension are."""
    jobs: list[ImageJob] = []
    errors: list[str] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                errors.append(f"folder {path} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            jobs += [ImageJob(p, (Path(path.resolve().name) / p.relative_to(path).with_suffix("")).as_posix())
                     for p in found]
        elif path.is_file():
            jobs.append(ImageJob(path, path.stem))
        else:
            errors.append(f"{path} does not exist")
    return _unique_names(jobs), errors


def _unique_names(jobs: list[ImageJob]) -> list[ImageJob]:
    """Two images with the same output name (a.png and a.jpg, the same name in two folders) get -2, -3 ..."""
    seen: dict[str, int] = {}
    unique = []
    for job in jobs:
        count = seen.get(job.name, 0) + 1
        seen[job.name] = count
        unique.append(job if count == 1 else ImageJob(job.path, f"{job.name}-{count}"))
    return unique


def network_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The size the network sees: the image's own, or scaled down so its longer side is ``max_side``."""
    if not max_side or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


class Predictor:
    """One image at a time through a run's segmentation model, paths really skipped."""

    def __init__(self, run: TrainedRun, max_side: int = DEFAULT_MAX_SIDE) -> None:
        if not isinstance(run.model, DynamicRoutingSegmenter):
            raise RunDirError(f"run {run.run_dir} is a {run.cfg.task} run; pipeline/predict.py draws segmentation "
                              "(pipeline/evaluate.py scores a detector's COCO AP)")
        self.run, self.model, self.max_side = run, run.model, max_side
        self.reference = cost_table(self.model.config, *REFERENCE_SIZE)
        self.tables: dict[tuple[int, int], CostTable] = {}

    @torch.no_grad()
    def __call__(self, rgb: Image.Image) -> dict[str, Any]:
        height, width = rgb.height, rgb.width
        size = network_size(height, width, self.max_side)
        image = normalize_image(np.asarray(rgb))[None]
        if size != (height, width):
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        out = self.model(image)  # pads to a multiple of 32 and crops the logits back to ``size``
        logits = out.logits
        if size != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        gates = out.backbone.gates.float()
        table = self.tables.setdefault(size, cost_table(self.model.config, *size))
        cluster, distance = nearest_centre(out.backbone.activations.float().numpy(), self.run.centres)
        return {"train_ids": logits.argmax(1)[0].numpy().astype(np.uint8), "gates": gates[0].numpy(),
                "height": height, "width": width, "network_height": size[0], "network_width": size[1],
                "gflops": float(real_cost(gates, table)[0]) / 1e9,
                REFERENCE_COLUMN: float(real_cost(gates, self.reference)[0]) / 1e9,
                "cluster": int(cluster[0]), "distance": float(distance[0])}


def write_outputs(job: ImageJob, rgb: Image.Image, result: dict[str, Any], out: Path, alpha: float,
                  predictor: Predictor) -> dict[str, str]:
    target = out / job.name
    target.parent.mkdir(parents=True, exist_ok=True)
    files = {"prediction": f"{target}_prediction.png", "label_ids": f"{target}_labelIds.png",
             "route": f"{target}_route.png"}
    colours = Image.fromarray(colourise(result["train_ids"]))
    Image.blend(rgb, colours, alpha).save(files["prediction"])
    Image.fromarray(train_ids_to_label_ids(result["train_ids"])).save(files["label_ids"])
    caption = (f"{job.path.name}: {result['height']}x{result['width']}, {result['gflops']:.4f} GFLOPs "
               f"({result[REFERENCE_COLUMN]:.2f} at {REFERENCE_SIZE[0]}x{REFERENCE_SIZE[1]}), "
               f"cluster {result['cluster']} (distance {result['distance']:.3f})")
    Path(files["route"]).write_bytes(routes_figure(predictor.model.config, [(result["gates"], caption)]))
    return files


def predict(run_dir: Path, images: list[Path], out: Path, alpha: float = DEFAULT_ALPHA,
            max_side: int = DEFAULT_MAX_SIDE) -> tuple[list[dict[str, Any]], list[str]]:
    """Predict every image; the rows of ``predictions.parquet`` and an error message per failed path."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {alpha}")
    if max_side < 0:
        raise ValueError(f"--max-side must be >= 0, got {max_side}")
    predictor = Predictor(load_run(run_dir), max_side)
    jobs, errors = collect_images(images)
    for error in errors:
        print(f"pipeline/predict.py: error: {error}", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for job in jobs:
        try:
            rgb = read_rgb(job.path)  # grey, RGBA, palette, 16-bit grey -> 8-bit RGB; a bad file is named
        except DatasetError as error:
            errors.append(str(error))
            print(f"pipeline/predict.py: error: {error}", file=sys.stderr, flush=True)
            continue
        result = predictor(rgb)
        files = write_outputs(job, rgb, result, out, alpha, predictor)
        rows.append({"image": str(job.path), **{k: result[k] for k in SCHEMA.names if k in result}, **files})
        print(f"{job.path}: {result['height']}x{result['width']}, {result['gflops']:.4f} GFLOPs "
              f"({result[REFERENCE_COLUMN]:.2f} at 1024x2048), cluster {result['cluster']} "
              f"(distance {result['distance']:.3f})", flush=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out / PREDICTIONS_FILE)
    return rows, errors


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows, errors = predict(args.run_dir, args.images, args.out, args.alpha, args.max_side)
    except (RunDirError, ValueError) as error:
        print(f"pipeline/predict.py: error: {error}", file=sys.stderr)
        return 2
    print(f"{len(rows)} image(s) predicted into {args.out} ({PREDICTIONS_FILE}: one row each)")
    if errors:
        print(f"pipeline/predict.py: {len(errors)} path(s) failed:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
