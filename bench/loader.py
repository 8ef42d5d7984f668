"""Can the training DataLoader keep a training step fed? Images/s of the loader alone against a step's.

    python bench/loader.py --json bench/results/loader.json

The loader is the pipeline's own (``pipeline.train_data.train_loader``: the Cityscapes-layout dataset,
random scale / crop / flip seeded per image, the task's collate), run alone: nothing consumes the
batches. Two settings, both on generated study images (``divdr.data.synthetic``; PNGs as Cityscapes'):

- ``study 128x256``: the embedded study's 128x256 images, a 128x256 crop, the ``small`` net, batch 16;
- ``768x768 of 1024x2048``: Cityscapes-size images (1024x2048, the PNGs ~4 MB), DR's recipe (scale
  0.5-2.0, a 768x768 crop), Layer16, batch 8 (the GPU figure below).

Variants, run in interleaved rounds (``bench.common.interleaved``): the loader with 0 (in-process),
1 and 2 worker processes (``data.loader_workers``), pinned and unpinned where a CUDA device exists (the
batches then copied there, as in training); and the training step of the same setting on the CPU
(``pipeline.loop.Trainer.run_step`` on batches made beforehand; Layer16 at 768x768 with batch 1 to keep
its memory small: images/s is per image). A loader round is one epoch (its first batch included:
what a step waits for at each epoch's start); a step round is a few steps.

The GPU's appetite is quoted, not measured here (the GPU check of 2026-11-26, one H200, torch 2.11):
Layer16 768x768 batch 8 trained at 28.7 images/s; the ``small`` net at 128x256 ran ~5 steps/s at batch 16
(~80 images/s, overhead-bound). The target is 4x those. ``cores_for_*`` divides them by what one core
prepares (the in-process loader: no copies between processes; an extrapolation: linear scaling over
cores is assumed, not measured here). ``stages_ms``: where one image's time goes (decode, labels, the
scaled crop and flip, normalised: ``RandomScaleCropFlip`` computes only the crop), timed on a few images
with the dataset's own functions.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cap_threads, finish, interleaved, median, parser, ratio_summary, table

# Measured on one H200 on 2026-11-26 (torch 2.11, the library alone): Layer16, 768x768, batch 8, fp32;
# the small net at 128x256 in a plain loop ~5 steps/s at batch 16
H200_LAYER16_768_IMAGES_PER_S = 28.7
H200_SMALL_128X256_IMAGES_PER_S = 5 * 16
GPU_TARGET_FACTOR = 4  # issue #20: keep a GPU fed at 4x today's step rate


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    image: tuple[int, int]  # generated image size (height, width)
    crop: tuple[int, int]
    scale: tuple[float, float]
    model_size: str
    batch: int
    step_batch: int  # batch of the timed CPU step
    images: int  # distinct images generated
    repeat: int  # the training set is the images this many times over (each with its own augmentation)
    gpu_images_per_s: float  # what one H200 trained at (quoted above)


SETTINGS = (
    Setting("study 128x256", (128, 256), (128, 256), (0.5, 2.0), "small", 16, 16, 64, 2,
            H200_SMALL_128X256_IMAGES_PER_S),
    Setting("768x768 of 1024x2048", (1024, 2048), (768, 768), (0.5, 2.0), "layer16", 8, 1, 8, 4,
            H200_LAYER16_768_IMAGES_PER_S),
)
TINY = (Setting("tiny 64x128", (64, 128), (64, 64), (0.5, 2.0), "micro", 4, 4, 8, 1, H200_SMALL_128X256_IMAGES_PER_S),)


def make_images(setting: Setting, folder: Path) -> Path:
    from divdr.data.study import study_config
    from divdr.data.synthetic import generate

    root = folder / setting.name.replace(" ", "_")
    generate(study_config(n_train=setting.images, n_val=1, height=setting.image[0], width=setting.image[1],
                          seed=0), root)
    return root


def experiment(setting: Setting, root: Path, batch: int, extra: list[str] = ()) -> Any:
    from pipeline.config import resolve, with_data_root

    cfg = resolve("DivDR-A", None, [f"model_size={setting.model_size}", f"train.batch_size={batch}",
                                    f"train.crop=[{setting.crop[0]}, {setting.crop[1]}]",
                                    f"train.scale_min={setting.scale[0]}", f"train.scale_max={setting.scale[1]}",
                                    *extra])
    return with_data_root(cfg, root)


def training_set(cfg: Any, repeat: int) -> Any:
    from torch.utils.data import ConcatDataset

    from pipeline.tasks import make_task

    task = make_task(cfg)
    one = task.train_dataset()
    return task, (ConcatDataset([one] * repeat) if repeat > 1 else one)


def loader_variant(setting: Setting, root: Path, workers: int, pinned: bool, device: Any) -> dict[str, Any]:
    """A loader (its processes started by a first, untimed epoch) and a function timing one epoch."""
    import torch

    from pipeline.train_data import train_loader

    cfg = experiment(setting, root, setting.batch, [f"data.loader_workers={workers}",
                                                    f"data.pin_memory={str(pinned).lower()}"])
    task, data = training_set(cfg, setting.repeat)
    batches = train_loader(cfg, data, task.collate, device)
    epoch = [0]
    first_batch: list[float] = []

    def run_epoch() -> tuple[int, float, float]:
        batches.sampler.set_epoch(epoch[0])
        epoch[0] += 1
        count, start, first = 0, time.perf_counter(), None
        for batch in batches:
            if device.type == "cuda":
                torch.cuda.synchronize()
            count += len(batch["sample_id"])
            if first is None:
                first = time.perf_counter() - start
        return count, time.perf_counter() - start, first

    started = time.perf_counter()
    run_epoch()  # worker start-up and first-call costs, not timed
    startup = time.perf_counter() - started

    def timed() -> float:
        count, seconds, first = run_epoch()
        first_batch.append(first)
        return count / seconds

    return {"run": timed, "startup_epoch_s": startup, "first_batch_s": first_batch,
            "batches_per_epoch": len(batches), "batch": setting.batch}


def step_variant(setting: Setting, root: Path, steps: int) -> dict[str, Any]:
    """``Trainer.run_step`` of the setting on the CPU, on batches loaded beforehand."""
    import torch

    from pipeline.loop import Trainer
    from pipeline.train_data import train_loader

    cfg = experiment(setting, root, setting.step_batch, ["data.loader_workers=0", f"train.steps={10 ** 6}"])
    task, data = training_set(cfg, setting.repeat)
    made = list(train_loader(cfg, data, task.collate))[: max(steps, 1)]
    torch.manual_seed(0)
    trainer = Trainer(cfg, task, task.build_model())
    trainer.run_step(made[0])  # first-call allocations, not timed
    done = [0]

    def timed() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.run_step(made[done[0] % len(made)])
            done[0] += 1
        return steps * setting.step_batch / (time.perf_counter() - start)

    return {"run": timed, "batch": setting.step_batch}


def stage_times(setting: Setting, root: Path, count: int) -> dict[str, float]:
    """Milliseconds per image of each stage of a training sample, on ``count`` images (one thread), as
    ``CityscapesSegmentation.__getitem__`` runs them with ``RandomScaleCropFlip``."""
    import numpy as np
    import torch

    from divdr.data.cityscapes import (
        CityscapesSegmentation,
        image_tensor,
        label_ids_to_train_ids,
        normalize,
        read_label_ids,
        read_rgb,
    )
    from divdr.data.transforms import RandomScaleCropFlip, SegTransformConfig

    data = CityscapesSegmentation(root, "train")
    transform = RandomScaleCropFlip(SegTransformConfig(crop_size=setting.crop, scale_range=setting.scale))
    generator = torch.Generator().manual_seed(0)
    times = dict.fromkeys(("decode image", "decode labels", "label ids", "scaled crop+flip, normalised"), 0.0)
    for i in range(count):
        marks = [time.perf_counter()]
        pixels = image_tensor(np.array(read_rgb(data.images[i % len(data)]), dtype=np.uint8))
        marks.append(time.perf_counter())
        ids = read_label_ids(data.labels[i % len(data)])
        marks.append(time.perf_counter())
        label = torch.from_numpy(label_ids_to_train_ids(ids))
        marks.append(time.perf_counter())
        transform(pixels, label, generator, normalize=normalize)
        marks.append(time.perf_counter())
        for key, start, end in zip(times, marks, marks[1:], strict=False):
            times[key] += end - start
    return {key: 1e3 * value / count for key, value in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (an epoch per loader variant)")
    p.add_argument("--workers", default="0,1,2", help="loader processes to compare (comma-separated)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round of the CPU step")
    args = p.parse_args(argv)
    settings = SETTINGS
    if args.tiny:
        settings, args.rounds, args.workers, args.steps = TINY, 1, "0,1", 1
    started = time.perf_counter()
    cap_threads(args.threads)
    import torch

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    pins = (False, True) if device.type == "cuda" else (False,)  # pinning needs an accelerator
    workers = [int(w) for w in args.workers.split(",")]
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for setting in settings:
            made = time.perf_counter()
            root = make_images(setting, Path(folder))
            print(f"{setting.name}: {setting.images} images generated in {time.perf_counter() - made:.1f} s",
                  flush=True)
            variants = {f"loader w{w}{' pinned' if pin else ''}": loader_variant(setting, root, w, pin, device)
                        for w in workers for pin in pins}
            variants["CPU step"] = step_variant(setting, root, args.steps)
            figures = interleaved({name: v["run"] for name, v in variants.items()}, args.rounds)
            step = figures["CPU step"]
            one_core = median(figures.get("loader w0", [float("nan")]))
            gpu_now = setting.gpu_images_per_s
            result = {
                "image": setting.image, "crop": setting.crop, "scale": setting.scale,
                "model_size": setting.model_size, "batch": setting.batch, "step_batch": setting.step_batch,
                "epoch_images": setting.images * setting.repeat,
                "images_per_s": {name: {"median": median(v), "rounds": v} for name, v in figures.items()},
                "loader_over_cpu_step": {name: ratio_summary(v, step) for name, v in figures.items()
                                         if name != "CPU step"},
                "startup_epoch_s": {name: v["startup_epoch_s"] for name, v in variants.items() if "loader" in name},
                "first_batch_s": {name: median(v["first_batch_s"]) for name, v in variants.items()
                                  if "loader" in name},
                "h200_images_per_s": gpu_now,
                "cores_for_h200_now": gpu_now / one_core,
                "cores_for_h200_target": GPU_TARGET_FACTOR * gpu_now / one_core,
                "stages_ms": stage_times(setting, root, 2 if args.tiny else 12),
            }
            results[setting.name] = result
            for name, v in figures.items():
                row = {"setting": setting.name, "variant": name, "images_per_s": median(v),
                       "min": min(v), "max": max(v)}
                if name != "CPU step":
                    ratio = result["loader_over_cpu_step"][name]
                    row.update(over_cpu_step=ratio["median"], over_h200_now=median(v) / gpu_now,
                               over_h200_target=median(v) / (GPU_TARGET_FACTOR * gpu_now),
                               first_batch_s=result["first_batch_s"][name])
                rows.append(row)
    columns = ["setting", "variant", "images_per_s", "min", "max", "over_cpu_step", "over_h200_now",
               "over_h200_target", "first_batch_s"]  # over_h200_*: against that setting's H200 figure
    fmt = {"images_per_s": ".1f", "min": ".1f", "max": ".1f", "over_cpu_step": ".2f", "over_h200_now": ".2f",
           "over_h200_target": ".3f", "first_batch_s": ".2f"}
    print(table(rows, columns, fmt))
    for name, r in results.items():
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages_ms"].items())
        print(f"{name}: ms per image: {stages}")
        print(f"{name}: one core feeds {1 / r['cores_for_h200_now']:.2f}x the H200's step today "
              f"({r['h200_images_per_s']:.1f} images/s): ~{r['cores_for_h200_now']:.1f} loader cores for it, "
              f"~{r['cores_for_h200_target']:.1f} for {GPU_TARGET_FACTOR}x")
    result = {"benchmark": "loader", "threads": args.threads, "rounds": args.rounds, "device": str(device),
              "gpu_target_factor": GPU_TARGET_FACTOR,
              "settings": results, "rows": rows}
    return finish(result, args.json, started)


if __name__ == "__main__":
    main()
