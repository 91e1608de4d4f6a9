"""Data parallelism through ``torchrun``: which process this is, and its share of each global batch.

``torchrun --nproc_per_node N -m analyses train ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in their environment (multi-node: ``--nnodes``/``--rdzv-endpoint``, same code). Every process
draws the same global batch from the same seeded stream and trains on its own contiguous slice of it under
``DistributedDataParallel``, which averages the gradients: one step equals the single-process step on the
whole global batch. Backend: NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from forethought.core.errors import ForethoughtError


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job (a single-process run is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> Distributed:
        """Read torchrun's environment and join the process group (once); single-process when unset."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(rank, world_size, local_rank)

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
        return torch.device("cuda", self.local_rank) if self.enabled and device.type == "cuda" else device

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous rows of a global batch [batch, ...]."""
        if len(batch) % self.world_size:
            raise ForethoughtError(
                f"batch size {len(batch)} is not divisible by the {self.world_size} processes of this job"
            )
        size = len(batch) // self.world_size
        return batch[self.rank * size : (self.rank + 1) * size]

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DistributedDataParallel (gradients averaged over ranks), or itself."""
        if not self.enabled:
            return model
        device_ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def mean(self, value: float) -> float:
        """The mean of a scalar over ranks (every rank gets it)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda(self.local_rank)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (tokenising, writing files); the others run it after, reusing that."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()
