"""What the causal tests share (plumbing for ``intervene`` and the synthetic experiment): the edits compared, the
table's extra columns, and Δloss rows by path and offset with document-level intervals."""

from __future__ import annotations

from typing import Any

import numpy as np

from forethought.probes.erasure import ConceptEraser, ErasureFit
from forethought.probes.metrics import mean_scores

LEACE, RANDOM, NET = "leace", "random", "leace − random"  # the concept erased; the control; their paired difference
CAUSAL_COLUMNS = ["edit", "rank", "path", "offset"]  # a causal table's columns beyond the tidy ones


def erasers(fit: ErasureFit, rank: int, seed: int) -> dict[str, ConceptEraser]:
    """The concept's erasure at ``rank`` and its control: random whitened directions (``seed``) of the same rank,
    whitened variance and raw variance removed (:meth:`~probes.erasure.ErasureFit.random_eraser`)."""
    concept = fit.eraser(rank)
    return {LEACE: concept, RANDOM: fit.random_eraser(rank, seed, like=concept)}


def effect_rows(cell: dict[str, Any], effects: dict[str, np.ndarray], clusters: np.ndarray, seed: int,
                metric: str = "delta_loss") -> list[dict[str, Any]]:
    """Rows of each edit's effects [n, positions, offsets 0 … K] (:data:`LEACE`, :data:`RANDOM`) and of
    "leace − random" (the paired difference, example by example): the mean per offset (path "own" at 0, "future"
    from 1) and the future path summed over offsets 1 … K (offset empty); an example is (sequence, t) and
    intervals resample its ``clusters`` [n] (documents)."""
    effects = {**effects, NET: effects[LEACE] - effects[RANDOM]}
    rows = []
    for edit, values in effects.items():
        unit = np.repeat(clusters, values.shape[1])
        flat = values.reshape(-1, values.shape[2])
        rows += [{**cell, "edit": edit, "metric": metric, "path": "own" if offset == 0 else "future", "offset": offset,
                  **estimate.columns()} for offset, estimate in enumerate(mean_scores(flat, unit, seed=seed))]
        (future,) = mean_scores(flat[:, 1:].sum(1), unit, seed=seed)
        rows.append({**cell, "edit": edit, "metric": metric, "path": "future", **future.columns()})
    return rows
