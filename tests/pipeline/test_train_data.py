"""The training batches (``pipeline.train_data``, no Ray): the loader's settings, the batches it gives
whatever the number of loader processes, and the device they land on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from divdr.config import ConfigError
from pipeline.config import resolve, with_data_root, with_smoke
from pipeline.loop import Hook, Trainer
from pipeline.tasks import limit, make_task
from pipeline.train_data import EpochSampler, local_device, move_to, pin_memory, sample_seed, train_loader
from tests.pipeline.conftest import make_study


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory, n_train=12, n_val=4, seed=5)


def config(study: Path, *overrides: str):
    cfg = resolve("DivDR-A", None, ["train.batch_size=4", "train.steps=6", "data.max_train_images=0", *overrides],
                  base=with_smoke({}))
    return with_data_root(cfg, study)


def loader_for(cfg, device="cpu", rank=0, world_size=1):
    task = make_task(cfg)
    return task, train_loader(cfg, limit(task.train_dataset(), cfg.data.max_train_images), task.collate, device,
                              rank, world_size)


def epochs(batches, count: int) -> list[dict]:
    seen = []
    for epoch in range(count):
        batches.sampler.set_epoch(epoch)
        seen += list(batches)
    return seen


def test_the_loader_is_built_from_the_data_section(study):
    _, batches = loader_for(config(study, "data.loader_workers=1", "data.prefetch_factor=5"))
    loader = batches.loader
    assert loader.num_workers == 1 and loader.persistent_workers and loader.prefetch_factor == 5
    assert not loader.pin_memory and not batches.non_blocking  # the CPU: nothing to pin for
    assert loader.drop_last and loader.batch_size == 4
    assert isinstance(batches.sampler, EpochSampler) and batches.sampler.sampler.drop_last

    _, batches = loader_for(config(study, "data.loader_workers=0", "data.prefetch_factor=5"))
    assert batches.loader.num_workers == 0 and not batches.loader.persistent_workers
    assert batches.loader.prefetch_factor is None  # torch refuses one without workers

    _, batches = loader_for(config(study, "data.loader_workers=2", "data.persistent_workers=false"))
    assert batches.loader.num_workers == 2 and not batches.loader.persistent_workers


def test_pinned_memory_by_default_only_for_a_cuda_device(study):
    cuda = torch.device("cuda", 0)  # a device object only: nothing is allocated there
    assert pin_memory(config(study), cuda) and not pin_memory(config(study), torch.device("cpu"))
    assert not pin_memory(config(study, "data.pin_memory=false"), cuda)
    assert pin_memory(config(study, "data.pin_memory=true"), torch.device("cpu"))


def test_each_rank_gets_its_share_and_the_batch_fits_it(study):
    cfg = config(study, "train.batch_size=8", "data.loader_workers=0")
    shares = [loader_for(cfg, rank=rank, world_size=3)[1] for rank in range(3)]
    assert [b.loader.batch_size for b in shares] == [4, 4, 4]  # 12 images / 3 ranks
    ids = [sorted(i for batch in b for i in batch["sample_id"]) for b in shares]
    assert sorted(i for share in ids for i in share) == list(range(12)) and all(len(s) == 4 for s in ids)


@pytest.mark.parametrize("workers", [1, 2])
def test_loader_processes_give_the_same_batches_as_the_training_process(study, workers):
    """The same images in the same order, with the same crops and flips, epoch after epoch."""
    _, inline = loader_for(config(study, "data.loader_workers=0"))
    _, parallel = loader_for(config(study, f"data.loader_workers={workers}"))
    a, b = epochs(inline, 2), epochs(parallel, 2)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):
        assert x["sample_id"] == y["sample_id"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


def test_augmentation_is_drawn_per_image_and_epoch_not_from_the_training_rng(study):
    _, batches = loader_for(config(study, "data.loader_workers=0", "train.scale_min=0.5", "train.scale_max=2"))
    before = torch.get_rng_state()
    both = epochs(batches, 2)
    first, second = both[:len(both) // 2], both[len(both) // 2:]
    assert torch.equal(torch.get_rng_state(), before)  # the gates' Gumbel noise never depends on loading
    by_id = {i: batch["image"][n] for batch in first for n, i in enumerate(batch["sample_id"])}
    again = {i: batch["image"][n] for batch in second for n, i in enumerate(batch["sample_id"])}
    assert sum(not torch.equal(by_id[i], again[i]) for i in by_id) >= len(by_id) // 2  # epoch 1 crops anew
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1) and sample_seed(0, 1, 2) == sample_seed(0, 1, 2)


class Seen(Hook):
    def __init__(self) -> None:
        self.ids: list[list[int]] = []

    def before_step(self, trainer, batch) -> None:
        self.ids.append(list(batch["sample_id"]))


def test_training_with_loader_processes_is_the_training_without(study):
    """``Trainer.fit`` over two epochs: the same batches, hence the same weights, bit for bit (CPU)."""
    results = []
    for workers in (0, 2):
        cfg = config(study, f"data.loader_workers={workers}", "model.gate.kind=gumbel")  # Gumbel: random draws
        torch.manual_seed(cfg.train.seed)
        task, batches = loader_for(cfg)
        seen = Seen()
        trainer = Trainer(cfg, task, task.build_model(), hooks=[seen])
        trainer.fit(batches, batches.sampler)
        results.append((seen.ids, trainer.net.state_dict()))
    (ids_a, state_a), (ids_b, state_b) = results
    assert len(ids_a) == 6 and ids_a == ids_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_batches_land_on_the_device(study):
    _, batches = loader_for(config(study, "data.loader_workers=0"), device="meta")  # a device with no data
    batch = next(iter(batches))
    assert batch["image"].device.type == "meta" and batch["label"].device.type == "meta"
    assert isinstance(batch["sample_id"][0], int)
    nested = move_to({"images": [torch.zeros(2)], "targets": ({"boxes": torch.ones(1, 4)},), "n": 3}, "meta")
    assert nested["images"][0].is_meta and nested["targets"][0]["boxes"].is_meta and nested["n"] == 3
    assert isinstance(nested["targets"], tuple)


def test_a_local_run_on_a_gpu_needs_one(monkeypatch):
    assert local_device(resolve(None, None, [])).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"scaling\.use_gpu=true, but torch sees no CUDA device"):
        local_device(resolve(None, None, ["scaling.use_gpu=true"]))
