"""Compute precision of forward passes and probe fitting: float32, or bfloat16 autocast.

bfloat16 autocast runs matrix products in bfloat16 while weights, reductions and losses stay float32. On CPUs
with AMX / AVX512-BF16 (this project's machines) a 576 × 49,152 product runs ~5–10× faster than in float32,
and a SmolLM2 forward pass ~3× faster; on GPUs it is the usual mixed precision.
"""

from __future__ import annotations

import torch

from forethought.core.errors import ForethoughtError

PRECISIONS = ("float32", "bfloat16")
TRAINING_PRECISIONS = ("auto", *PRECISIONS)  # training's "auto": bfloat16 on CUDA, float32 elsewhere


def check_precision(precision: str, allowed: tuple[str, ...] = PRECISIONS) -> str:
    if precision not in allowed:
        raise ForethoughtError(f"unknown precision {precision!r}; choose one of {', '.join(allowed)}")
    return precision


def training_precision(precision: str, device: str | torch.device) -> str:
    """A training run's precision: ``auto`` → bfloat16 autocast on CUDA, float32 on other devices."""
    if check_precision(precision, TRAINING_PRECISIONS) == "auto":
        return "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return precision


def autocast(device: str | torch.device, precision: str) -> torch.autocast:
    """A context running the matrix products inside it in ``precision`` on ``device``."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=check_precision(precision) == "bfloat16")
