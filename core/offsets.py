"""τ alignment, in one place: the quantity τ positions away from each probed position t.

Every probe target in the workbench is ``values[:, t + τ]`` read at probed positions t = 0 … n − 1: the token
τ ahead (future-token probes and their count baselines, τ ≥ 1; τ = 0: the current token), the node τ ahead on a
path-star path, or an input j positions back (the synthetic task's lookbacks, τ = −j).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Values = TypeVar("Values", np.ndarray, torch.Tensor)


def at_offset(values: Values, tau: int, n_positions: int | None = None, fill: float | None = None) -> Values:
    """``values`` [batch, T, ...] → [batch, n_positions, ...] whose entry t is ``values[:, t + τ]``, for
    t = 0 … n_positions − 1 (default: all T). Where t + τ falls outside the sequence the entry is ``fill``;
    without a ``fill`` every t + τ must lie inside (a view then, no copy)."""
    length = values.shape[1]
    n_positions = length if n_positions is None else n_positions
    if not 0 <= n_positions <= length:
        raise ValueError(f"{n_positions} probed positions do not fit in sequences of {length}")
    first, end = max(0, -tau), min(n_positions, length - tau)  # the t whose t + τ lies in 0 … T − 1
    if first == 0 and end == n_positions:
        return values[:, tau : tau + n_positions]
    if fill is None:
        raise ValueError(f"τ = {tau} reaches outside sequences of {length} from positions 0 … {n_positions - 1}")
    shape = (values.shape[0], n_positions, *values.shape[2:])
    out = (torch.full(shape, fill, dtype=values.dtype, device=values.device) if isinstance(values, torch.Tensor)
           else np.full(shape, fill, dtype=values.dtype))
    if first < end:
        out[:, first:end] = values[:, first + tau : end + tau]
    return out
