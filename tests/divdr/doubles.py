"""Test doubles shared by the model tests."""

import pytest
import torch
from torch import nn

import divdr.clustering as clustering


class Fixed(nn.Module):
    """Stands in for a gate or a router: per-image outputs decided in advance."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.values = values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.values[: x.shape[0]]


def record_batch_sizes(module: nn.Module, log: list[int]) -> None:
    """Append the batch size of every call of ``module`` to ``log`` (to see what was skipped)."""
    module.register_forward_hook(lambda m, args, out: log.append(args[0].shape[0]))


class FakeGpu:
    """faiss-gpu's pieces as a GPU build would have them: the GPU index is a CPU one that counts itself."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, gpus: int) -> None:
        self.indexes: list[int] = []
        self.temp_memory: list[int] = []
        fake = self

        class Resources:
            def setTempMemory(self, size: int) -> None:
                fake.temp_memory.append(size)

        def gpu_index(resources: Resources, dim: int):
            assert isinstance(resources, Resources)
            fake.indexes.append(dim)
            return clustering.faiss.IndexFlatL2(dim)

        monkeypatch.setattr(clustering.faiss, "StandardGpuResources", Resources, raising=False)
        monkeypatch.setattr(clustering.faiss, "GpuIndexFlatL2", gpu_index, raising=False)
        monkeypatch.setattr(clustering.faiss, "get_num_gpus", lambda: gpus)
        monkeypatch.setattr(clustering, "_gpu_resources", None)
