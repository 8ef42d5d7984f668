"""The training batches of one process: ``train_loader`` builds them for ``pipeline.worker`` (a Ray Train
rank) and ``pipeline.local`` (one process) alike.

- Order: a ``DistributedSampler`` (shuffled with ``train.seed`` and the epoch, every rank its own share,
  ``drop_last``) and ``drop_last`` batches, as before; ``Trainer.fit`` calls ``set_epoch`` each epoch.
- Augmentation: each image's random scale, crop and flip are drawn from a seed of its own,
  (``train.seed``, epoch, sample index), in a forked torch RNG. So a batch is the same whatever
  ``data.loader_workers`` (0 = in the training process, or that many processes beside it), and loading
  never draws from the training process's own RNG (the Gumbel noise of the gates). The loader's own
  generator is seeded too: its worker seeds are drawn from it, not from the global RNG.
- Speed (``data.loader_workers``, ``data.prefetch_factor``, ``data.persistent_workers``): batches are
  prepared in worker processes while the step runs; with ``data.pin_memory`` (default: on when the
  device is CUDA) they are collated into page-locked memory and copied to the device asynchronously
  (``non_blocking``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from divdr.config import ConfigError
from pipeline.config import ExperimentConfig

SampleKey = tuple[int, int]  # (epoch, index in the training set)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation in one epoch (64 bits, well mixed: neighbours differ)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])


class SeededSamples(Dataset):
    """``dataset[index]`` for the key ``(epoch, index)``, its random draws (torch's global RNG, which the
    transforms use) seeded by ``sample_seed``; the caller's RNG state is left as it was."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> Any:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset[index]


class EpochSampler(Sampler[SampleKey]):
    """``sampler``'s indices as ``(epoch, index)`` keys; ``set_epoch`` is passed on."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[SampleKey]:
        epoch = self.epoch
        return ((epoch, int(index)) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def move_to(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Every tensor of a batch (dicts, lists and tuples of them) on ``device``; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {key: move_to(value, device, non_blocking) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(value, device, non_blocking) for value in batch)
    return batch


@dataclass
class TrainLoader:
    """The batches ``Trainer.fit`` iterates, on ``device``; pass ``sampler`` to ``fit`` for ``set_epoch``."""

    loader: DataLoader
    sampler: EpochSampler
    device: torch.device

    @property
    def non_blocking(self) -> bool:
        """Asynchronous copies need page-locked batches (otherwise the copy waits anyway)."""
        return self.loader.pin_memory and self.device.type == "cuda"

    def __iter__(self) -> Iterator[Any]:
        if self.device.type == "cpu":
            yield from self.loader
            return
        for batch in self.loader:
            yield move_to(batch, self.device, self.non_blocking)

    def __len__(self) -> int:
        return len(self.loader)


def local_device(cfg: ExperimentConfig) -> torch.device:
    """The device of a run in one process (``pipeline.local``): CUDA with ``scaling.use_gpu``, else the CPU."""
    if not cfg.scaling.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("scaling.use_gpu=true, but torch sees no CUDA device here (torch "
                          f"{torch.__version__}, built for CUDA {torch.version.cuda}); drop it to train on the CPU")
    return torch.device("cuda", torch.cuda.current_device())


def pin_memory(cfg: ExperimentConfig, device: torch.device) -> bool:
    """``data.pin_memory``, or where it is null: on when the device is CUDA."""
    return device.type == "cuda" if cfg.data.pin_memory is None else cfg.data.pin_memory


def train_loader(cfg: ExperimentConfig, train_set: Dataset, collate: Callable[[list[Any]], Any],
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1) -> TrainLoader:
    """The training batches of rank ``rank`` of ``world_size``: its share of ``train_set``, ``collate``d
    per batch of ``train.batch_size`` (fewer where the share is smaller), on ``device``."""
    device = torch.device(device)
    data = cfg.data
    sampler = EpochSampler(DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                              seed=cfg.train.seed, drop_last=True))
    batch_size = min(cfg.train.batch_size, max(1, len(train_set) // world_size))
    workers = data.loader_workers
    loader = DataLoader(SeededSamples(train_set, cfg.train.seed), batch_size=batch_size, sampler=sampler,
                        drop_last=True, collate_fn=collate, num_workers=workers,
                        pin_memory=pin_memory(cfg, device),
                        persistent_workers=data.persistent_workers and workers > 0,
                        prefetch_factor=data.prefetch_factor if workers > 0 else None,
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    return TrainLoader(loader, sampler, device)
