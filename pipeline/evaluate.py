"""Score a finished run's model without training: ``python pipeline/evaluate.py RUN_DIR [--data D] [--out O] [--json]``.

Loads ``RUN_DIR/artifacts/model.pt`` and the run's configuration (``RUN_DIR/config.yaml``: its task and
data root), runs the model over the val split (paths really skipped) and reports:

- segmentation: mIoU and the IoU of each class, pixel accuracy; the predictions are written as
  Cityscapes labelIds PNGs (``OUT/labelIds/val/<city>/<id>_gtFine_labelIds.png``, the val images' own
  relative paths) that ``divdr eval-seg --pred OUT/labelIds --gt ROOT/gtFine/val`` scores to the same mIoU;
- detection / instance: COCO AP (bbox, and segm for instance) with the run's own evaluation, the
  detections in ``OUT/detections_val.json``;
- real GFLOPs per image (at the images' size and at the paper's reference size);
- each image's cluster: its nearest centre among the run's reported centres (``pipeline.trained_run``),
  with the distance; ``OUT/images.parquet`` per image, ``OUT/routes.png`` the centres' routes;
- ``OUT/evaluation.json``: everything above.
- with ``--export-routes`` (segmentation): each cluster's route (the mean gates of its images,
  ``divdr.export.cluster_routes``) exported as a static gate-free network (``divdr.export``), saved with
  ``torch.export`` as ``OUT/routes/cluster<k>.pt2`` (loads with ``torch.export.load`` alone, no divdr code;
  for images of the val images' size), with its GFLOPs and its mIoU on its cluster's images beside the
  dynamic network's on the same images: what deploying DivDR's K architectures instead of the dynamic
  network costs in accuracy and buys in FLOPs.

On the run's own data the val images are those the run scored (its ``data.max_val_images``), so the
figures are the run's own; ``--all-val`` scores every val image instead (what ``divdr eval-seg`` needs
to score a whole gtFine folder); ``--data DIR`` scores every val image of another dataset in the same
layout.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from divdr.data.cityscapes import IMAGE_DIR, IMAGE_SUFFIX, LABEL_DIR, LABEL_SUFFIX, CityscapesSegmentation
from divdr.data.coco import CocoDetection
from divdr.data.errors import DatasetError
from divdr.data.labels import LabelError, train_ids_to_label_ids
from divdr.data.manifest import SUBSET_MANIFEST, read_subset_manifest
from divdr.detection import DynamicRoutingDetector
from divdr.detection_eval import REFERENCE_SIZE as DETECTION_REFERENCE_SIZE
from divdr.detection_eval import iou_types_for, run_detection_inference, score_detections
from divdr.evaluation import REFERENCE_SIZE, InferenceResult, run_inference
from divdr.export import cluster_routes, export_route, route_flops
from divdr.metrics import ConfusionMatrix
from pipeline.analysis import routes_plot
from pipeline.trained_run import RunDirError, TrainedRun, load_run, nearest_centre

PREDICTIONS_DIR = "labelIds"
EXPORT_DIR = "routes"
REPORT_FILE = "evaluation.json"
IMAGES_FILE = "images.parquet"
ROUTES_FILE = "routes.png"
DETECTIONS_FILE = "detections_val.json"
RUN_VAL_ACTIVATIONS = "activations_val.parquet"

DESCRIPTION = ("Score a finished run's model without training: mIoU per class (COCO AP for detection), "
               "real GFLOPs, each val image's cluster, and the predictions as Cityscapes labelIds PNGs.")


class EvaluationError(ValueError):
    """Input this command cannot score (the message names the file or option)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline/evaluate.py", description=DESCRIPTION)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run's folder (<out>/<name>)")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="dataset root to score instead of the run's own (same layout: Cityscapes for "
                             "segmentation, COCO for detection); every val image is scored")
    parser.add_argument("--out", type=Path,
                        help="output folder (default RUN_DIR/evaluation, or RUN_DIR/evaluation-<data folder name> "
                             "with --data)")
    parser.add_argument("--all-val", action="store_true",
                        help="score every val image of the run's data, not only those the run scored "
                             "(its data.max_val_images)")
    parser.add_argument("--export-routes", action="store_true",
                        help="segmentation: export each cluster's route as a static network (OUT/routes/*.pt2) "
                             "and score it on its cluster's images")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    return parser


# ---- output folder ---------------------------------------------------------------------------------

def prepare_out(out: Path) -> None:
    """An output folder this command may write: new, empty, or an earlier evaluation's (replaced)."""
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / REPORT_FILE).is_file():
            raise EvaluationError(f"--out {out} holds files this command did not write (no {REPORT_FILE}); "
                                  "choose a new or empty folder")
        shutil.rmtree(out / PREDICTIONS_DIR, ignore_errors=True)  # no stale prediction of other images
    out.mkdir(parents=True, exist_ok=True)


def prediction_path(out: Path, image_file: str) -> Path:
    """``leftImg8bit/val/<city>/<id>_leftImg8bit.png`` -> ``OUT/labelIds/val/<city>/<id>_gtFine_labelIds.png``."""
    relative = Path(image_file).relative_to(IMAGE_DIR)
    return out / PREDICTIONS_DIR / relative.parent / (relative.name[: -len(IMAGE_SUFFIX)] + LABEL_SUFFIX)


class LabelIdsWriter:
    """Writes each predicted train-id map as a Cityscapes labelIds PNG (``run_inference``'s sink)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.written = 0

    def __call__(self, files: list[str], predictions: torch.Tensor) -> None:
        for file, predicted in zip(files, predictions.numpy(), strict=True):
            path = prediction_path(self.out, file)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(train_ids_to_label_ids(predicted.astype(np.uint8))).save(path)
            self.written += 1


# ---- scoring ---------------------------------------------------------------------------------------

def batch_size(run: TrainedRun, as_run: bool) -> int:
    """The run's evaluation batch size on its own images (the same batches: the same figures); one image at
    a time on other data, whose images may differ in size (a batch must not mix sizes)."""
    return run.cfg.data.eval_batch_size if as_run else 1


def val_count(run: TrainedRun, as_run: bool, available: int) -> int:
    """The run's own val images (its ``data.max_val_images``, 0 = all) when scoring ``as_run``; else all."""
    limit = run.cfg.data.max_val_images if as_run else 0
    return min(limit, available) if limit else available


def evaluate_segmentation(run: TrainedRun, root: Path, as_run: bool, out: Path) -> tuple[dict[str, Any],
                                                                                         InferenceResult]:
    dataset = CityscapesSegmentation(root, "val")
    count = val_count(run, as_run, len(dataset))
    writer = LabelIdsWriter(out)
    result = run_inference(run.model, dataset, batch_size(run, as_run), indices=range(count),
                           predictions=writer)
    scores = result.scores
    metrics = {"val_split_images": len(dataset), "miou": scores.miou, "pixel_accuracy": scores.pixel_accuracy,
               "per_class_iou": scores.per_class,
               "predictions": str(out / PREDICTIONS_DIR), "prediction_pngs": writer.written,
               "ground_truth": str(root / LABEL_DIR / "val")}
    return metrics, result


def evaluate_detection(run: TrainedRun, root: Path, as_run: bool, out: Path) -> tuple[dict[str, Any],
                                                                                       InferenceResult]:
    split = run.cfg.data.val_split
    dataset = CocoDetection(root / split, root / "annotations" / f"instances_{split}.json", train=False)
    model = run.model
    if dataset.num_categories != model.num_categories:
        raise EvaluationError(f"{dataset.annotation_json} lists {dataset.num_categories} categories; the run's "
                              f"detector was trained on {model.num_categories}")
    manifest_path = root / SUBSET_MANIFEST
    manifest = read_subset_manifest(manifest_path) if manifest_path.exists() else {}
    count = val_count(run, as_run, len(dataset))
    result = run_detection_inference(model, dataset, batch_size(run, as_run), indices=range(count),
                                     manifest=manifest)
    scores = score_detections(dataset.coco.dataset, result.results, result.image_ids, iou_types_for(model))
    (out / DETECTIONS_FILE).write_text(json.dumps(result.results))
    metrics = {"val_split_images": len(dataset), **scores, "detections": str(out / DETECTIONS_FILE),
               "ground_truth": str(dataset.annotation_json)}
    return metrics, result.routing


def per_image_table(routing: InferenceResult, clusters: np.ndarray, distances: np.ndarray,
                    reference: tuple[int, int]) -> pa.Table:
    return pa.table({
        "image": pa.array(routing.files), "subset": pa.array(routing.subsets),
        "cluster": pa.array(clusters), "distance": pa.array(distances), "gflops": pa.array(routing.real_gflops),
        f"gflops_{reference[0]}x{reference[1]}": pa.array(routing.real_gflops_reference),
    })


def agreement_with_run(run: TrainedRun, routing: InferenceResult, clusters: np.ndarray) -> list[int] | None:
    """[agreeing, compared]: of the images the run's own ``activations_val.parquet`` lists, how many get the
    cluster it gave them (own data only: the check that these are the run's centres)."""
    path = run.run_dir / "artifacts" / RUN_VAL_ACTIVATIONS
    if not path.is_file():
        return None
    table = pq.read_table(path, columns=["image", "cluster"]).to_pydict()
    reported = dict(zip(table["image"], table["cluster"], strict=True))
    pairs = [(reported[f], c) for f, c in zip(routing.files, clusters, strict=True) if f in reported]
    return [sum(int(r == c) for r, c in pairs), len(pairs)]


def export_routes(run: TrainedRun, root: Path, routing: InferenceResult, clusters: np.ndarray, k: int,
                  out: Path) -> list[dict[str, Any]]:
    """Per non-empty cluster: its route exported (``OUT/routes/cluster<k>.pt2``), its GFLOPs at the images'
    size and at the reference size, and the mIoU of the static network and of the dynamic one on the cluster's
    images."""
    sizes = {_height_width(root / f) for f in routing.files}
    if len(sizes) != 1:
        raise EvaluationError(f"--export-routes needs val images of one size (a static network is exported for "
                              f"one input size); {root} has {sorted(sizes)}")
    (height, width), = sizes
    dataset = CityscapesSegmentation(root, "val")
    model = run.model.eval()
    device = next(model.parameters()).device
    folder = out / EXPORT_DIR
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    routes = cluster_routes(routing.gates, clusters, k)
    rows = []
    for cluster in range(k):
        members = routing.sample_ids[clusters == cluster]
        if cluster not in routes:
            rows.append({"cluster": cluster, "images": 0})
            continue
        route = routes[cluster]
        static = export_route(model, route).to(device)
        confusion = ConfusionMatrix(model.config.num_classes)
        with torch.no_grad():
            for index in members:
                sample = dataset[int(index)]
                confusion.update(static(sample["image"][None].to(device)).argmax(1).cpu(), sample["label"][None])
            program = torch.export.export(static, (dataset[int(members[0])]["image"][None].to(device),))
        path = folder / f"cluster{cluster}.pt2"
        torch.export.save(program, path)
        dynamic = run_inference(model, dataset, 1, indices=members.tolist()).scores.miou
        reference = f"gflops_{REFERENCE_SIZE[0]}x{REFERENCE_SIZE[1]}"
        rows.append({"cluster": cluster, "images": len(members), "file": str(path),
                     "gflops": route_flops(model, route, height, width) / 1e9,
                     reference: route_flops(model, route, *REFERENCE_SIZE) / 1e9,
                     "miou_static": confusion.compute().miou, "miou_dynamic": dynamic})
    return rows


def evaluate(run_dir: Path, data: Path | None = None, out: Path | None = None,
             all_val: bool = False, routes: bool = False) -> dict[str, Any]:
    """Score the run in ``run_dir`` (see the module doc); returns what ``evaluation.json`` holds."""
    run = load_run(run_dir)
    own_data = data is None or data.resolve() == run.data_root.resolve()
    root = run.data_root if data is None else data.resolve()
    if not root.is_dir():
        raise EvaluationError(f"data root {root} does not exist"
                              + (" (the run's data.root); pass --data DIR" if data is None else ""))
    out = out or run.run_dir / ("evaluation" if own_data else f"evaluation-{root.name}")
    prepare_out(out)
    detection = run.cfg.task != "segmentation"
    if detection != isinstance(run.model, DynamicRoutingDetector):
        raise EvaluationError(f"{run.run_dir}: config.yaml says task {run.cfg.task!r} but artifacts/model.pt holds "
                              f"a {type(run.model).__name__}")
    reference = DETECTION_REFERENCE_SIZE if detection else REFERENCE_SIZE
    as_run = own_data and not all_val
    task_metrics, routing = (evaluate_detection if detection else evaluate_segmentation)(run, root, as_run, out)
    clusters, distances = nearest_centre(routing.activations, run.centres)
    k = len(run.centres)
    pq.write_table(per_image_table(routing, clusters, distances, reference), out / IMAGES_FILE)
    (out / ROUTES_FILE).write_bytes(routes_plot(run.model.config, run.centres, clusters, routing.real_gflops,
                                                routing.real_gflops_reference, reference, what="images"))
    heights_widths = sorted({_height_width(root / f) for f in routing.files})
    report = {
        "run_dir": str(run.run_dir), "preset": run.cfg.preset, "task": run.cfg.task, "data_root": str(root),
        "own_data": own_data, "as_run": as_run, "images": len(routing.files),
        "image_sizes": [list(s) for s in heights_widths],
        **task_metrics,
        "gflops_real": float(routing.real_gflops.mean()),
        f"gflops_real_{reference[0]}x{reference[1]}": float(routing.real_gflops_reference.mean()),
        "cluster_sizes": np.bincount(clusters, minlength=k).tolist(),
        "centres": run.centres_source,
        "clusters_as_reported": agreement_with_run(run, routing, clusters) if own_data else None,
        "reported": _reported(run.run_dir),
        "out": str(out),
    }
    if routes:
        if detection:
            raise EvaluationError("--export-routes is for segmentation runs (a detector's heads are not exported)")
        report["routes"] = export_routes(run, root, routing, clusters, k, out)
    (out / REPORT_FILE).write_text(json.dumps(_json_safe(report), indent=2))
    return report


def _height_width(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:  # the header only
        return image.height, image.width


def _reported(run_dir: Path) -> dict[str, Any]:
    """The run's own headline figures (result.json), to compare with."""
    path = run_dir / "result.json"
    if not path.is_file():
        return {}
    result = json.loads(path.read_text())
    keys = ("miou", "bbox/AP", "segm/AP", "gflops_real", "cluster_sizes")
    return {key: result[key] for key in keys if key in result}


def _json_safe(value: Any) -> Any:
    """NaN (an IoU of a class absent everywhere, an undefined AP) becomes null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def format_report(report: dict[str, Any]) -> str:
    sizes = ", ".join(f"{h}x{w}" for h, w in report["image_sizes"])
    scope = "the images the run scored" if report["as_run"] else "every val image"
    lines = [f"run {report['run_dir']} ({report['preset']}, {report['task']})",
             f"data {report['data_root']}: {report['images']} of {report['val_split_images']} val images ({scope}), "
             f"size {sizes}"]
    reported = report["reported"]
    if report["task"] == "segmentation":
        lines.append(f"mIoU {100 * report['miou']:.2f}   pixel accuracy {100 * report['pixel_accuracy']:.2f}"
                     + (f"   (the run reported mIoU {100 * reported['miou']:.2f})"
                        if report["as_run"] and "miou" in reported else ""))
        lines.append("IoU per class (n/a: in neither prediction nor ground truth):")
        for name, value in report["per_class_iou"].items():
            lines.append(f"  {name:<16} {'n/a' if math.isnan(value) else f'{100 * value:6.2f}'}")
    else:
        lines.append("COCO AP" + (f" (the run reported bbox/AP {reported['bbox/AP']:.4f})"
                                  if report["as_run"] and "bbox/AP" in reported else "") + ":")
        for key, value in report.items():
            if key.startswith(("bbox/", "segm/")):
                lines.append(f"  {key:<10} {'n/a' if math.isnan(value) else f'{value:.4f}'}")
    reference = next(key for key in report if key.startswith("gflops_real_"))
    lines.append(f"real GFLOPs per image: {report['gflops_real']:.4f} at the images' size, "
                 f"{report[reference]:.3f} at {reference.removeprefix('gflops_real_')}")
    agree = report["clusters_as_reported"]
    lines.append(f"clusters (nearest of {len(report['cluster_sizes'])} centres): sizes {report['cluster_sizes']}"
                 + (f"; {agree[0]} of the {agree[1]} images the run clustered as it did" if agree else ""))
    lines.append(f"centres: {report['centres']}")
    out = Path(report["out"])
    lines.append(f"wrote {out}: {REPORT_FILE}, {IMAGES_FILE} (per image: cluster, distance, GFLOPs), {ROUTES_FILE}")
    if report["task"] == "segmentation":
        lines.append(f"  {report['prediction_pngs']} labelIds PNGs in {report['predictions']}")
        if report["images"] == report["val_split_images"]:
            lines.append(f"  score them with: divdr eval-seg --pred {report['predictions']} "
                         f"--gt {report['ground_truth']}")
        else:  # eval-seg scores a whole gtFine folder
            lines.append(f"  (the run scored {report['images']} of the {report['val_split_images']} val images, its "
                         "data.max_val_images; --all-val predicts every one, for divdr eval-seg on the gtFine folder)")
    else:
        lines.append(f"  detections (COCO results JSON): {report['detections']}")
    for row in report.get("routes", []):
        if row["images"]:
            lines.append(f"  route of cluster {row['cluster']} ({row['images']} images): {row['gflops']:.4f} GFLOPs, "
                         f"mIoU {100 * row['miou_static']:.2f} static / {100 * row['miou_dynamic']:.2f} dynamic "
                         f"-> {row['file']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    try:
        report = evaluate(args.run_dir, args.data, args.out, args.all_val, args.export_routes)
    except (RunDirError, EvaluationError, DatasetError, LabelError) as error:
        print(f"pipeline/evaluate.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.json:
        print(json.dumps(_json_safe(report)))
    else:
        print(format_report(report))
    return report


if __name__ == "__main__":
    main()
