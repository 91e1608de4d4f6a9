"""Causal tests (``forethought intervene``): is what h[l, t] holds about x[t+τ] used, and by whom?

For each checkpoint, residual layer l and offset τ, the linear information about x[t+τ] in h[l, t] (the topk
probes' classes: the K most frequent tokens + "other") is erased by LEACE fitted on the probe-training documents
(:mod:`probes.erasure`), at each rank of a sweep and at full rank, beside two controls of the same rank: random
directions removing the same whitened and raw variance, and LEACE of an unrelated concept (the labels shuffled
over the rows: same classes and frequencies, nothing h holds). Each edit is made at one position t of the held-out
test documents at a time, and the change in next-token loss is read at t (the **own path**: t's own prediction) and
at t + 1 … t + τ (the **future path**: later positions read t only through its keys and values; :mod:`probes.paths`
shows the two routes split one edited run exactly). Every effect has a 95 % interval resampling documents;
"leace − random" and "leace − shuffled" are the paired differences: the effect beyond an equally large edit, and
beyond the method's own pick of directions for a concept that is not there.

Reading: information used by later positions but not by t itself — future path beyond control, own path not —
is **pre-cached**; used by both, a **breadcrumb** (computed for t, read again later). For a myopic twin the
future path gets no training signal, so its future-path effect is what untrained reading of t's keys and values
gives. Beside every effect: what a freshly fitted least-squares linear probe still explains of the concept after
the edit (R² ≤ 0 at full rank: the erasure worked) and the raw variance each edit removed.

With ``head`` k > 1 (a multi-token twin, ``train --objective mtp:K``, K ≥ k) the loss read is that of its head k,
which predicts x[s+k] at each position s: the own path then asks whether t uses what it holds about x[t+k] for the
prediction it was trained to make of it — where the twin is *told* to use it, a check of the test itself.

With ``given`` k (e.g. 1), only what h holds about x[t+τ] *beyond* x[t+k] is erased: tokens two ahead are
correlated with the next one, so a plain eraser of x[t+2] also removes some of x[t+1]; this one leaves x[t+1]'s best
linear readout of h exactly as it was (:meth:`probes.erasure.ErasureFit.beyond`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import plotly.graph_objects as go

from forethought.analyses.causal import (
    CAUSAL_COLUMNS,
    CONTROLS,
    TEST_FRACTION,
    CausalViews,
    causal_rows,
    check_causal,
    check_controls,
)
from forethought.analyses.engine import Probing, load_checkpoints
from forethought.analyses.experiment import ExperimentResults, finish_run, prepare_out, writes_run
from forethought.analyses.probing import ProbeSettings, check_names
from forethought.analyses.results import run_meta, tidy
from forethought.core.errors import ForethoughtError
from forethought.core.settings import check_settings
from forethought.probes.metrics import POOLED


@dataclass
class InterveneConfig:
    """Settings of ``forethought intervene``; every field is also a command-line flag."""

    checkpoints: dict[str, str] = field(default_factory=dict)  # models: run folder, hub id, smollm2-135m or gguf:PATH
    corpus: str | None = None  # held-out text from another corpus (default: the checkpoints' own test documents)
    layout: str = "first"  # with `corpus`: 'first' or 'packed'
    seq_len: int = 64  # with `corpus`: sequence length
    tokens_root: str = "runs/tokens"  # token files are written (once) under here
    max_sequences: int = 400  # held-out sequences: erasers fitted on the probe-training documents, edits on test
    layers: tuple[int, ...] | None = None  # residual layers 0 … L to edit (default: all)
    taus: tuple[int, ...] = (1, 2, 3, 4)  # the concept: x[t+τ]
    top_k: int = 64  # the concept's classes: the K most frequent training tokens + "other" (K < d_model)
    ranks: tuple[int, ...] = (1, 4, 16, 64)  # erasure ranks (capped at the concept's); full rank is always added
    positions: int = 8  # positions t edited per sequence (evenly spaced; one edited run each)
    test_fraction: float = TEST_FRACTION  # share of the documents the effects are read on; the rest fit the erasers
    head: int = 1  # the loss read: 1, the next token; k > 1, a multi-token twin's head k (predicts x[t+k])
    given: int = 0  # k ≥ 1: erase only what h holds about x[t+τ] beyond x[t+k] (whose linear readout is kept)
    controls: tuple[str, ...] = CONTROLS  # 'random' (equal rank and variance) and/or 'shuffled' (unrelated concept)
    batch_sequences: int = 64  # sequences per forward pass
    seed: int = 0  # probe split, the controls' directions and shuffle, bootstrap
    device: str = "auto"  # "auto": CUDA when available, else the CPU
    precision: str = "float32"  # the cached residuals' forward (bfloat16: faster on AMX CPUs); edits run in float32
    out: str = "runs/intervene"  # run folder: table, meta.json, figures
    figures_dir: str | None = None  # also copy the figures here
    progress: bool = True  # show progress bars

    def __post_init__(self):
        check_settings(self)
        check_names(self.checkpoints)
        if not self.checkpoints:
            raise ForethoughtError("give `checkpoints` (name → folder)")
        if not self.ranks or min(self.ranks) < 1:
            raise ForethoughtError(f"ranks must be ≥ 1, got {', '.join(map(str, self.ranks)) or 'none'}")
        check_controls(self.controls)
        self.probe_settings()  # held-out, layer and τ settings are checked as the probes' are

    def probe_settings(self) -> ProbeSettings:
        """The held-out sample, split and residual caches are the probing engine's, with topk classes."""
        return ProbeSettings(corpus=self.corpus, layout=self.layout, seq_len=self.seq_len, tokens_root=self.tokens_root,
                             max_sequences=self.max_sequences, layers=self.layers, taus=self.taus, kind="topk",
                             top_k=self.top_k, batch_sequences=self.batch_sequences, random_init=False,
                             seed=self.seed, device=self.device, precision=self.precision, progress=self.progress)


@dataclass
class InterveneResults(ExperimentResults, CausalViews):
    """Δloss per (checkpoint, layer, τ, edit, rank, path, offset) with intervals, and the erasure checks
    (:class:`~analyses.causal.CausalViews`: effects, checks, figures)."""

    CONFIG: ClassVar[type] = InterveneConfig

    @property
    def head(self) -> int:
        return self.config.head

    @property
    def given(self) -> int:
        return self.config.given

    def figures(self) -> dict[str, go.Figure]:
        return self.causal_figures()

    def summary(self) -> str:
        return self.causal_summary()


@writes_run
def run_intervene(config: InterveneConfig) -> InterveneResults:
    """Fit the erasers, edit each test position, read the own- and future-path effects; write table and figures."""
    engine = Probing(load_checkpoints(dict(config.checkpoints)), config.probe_settings(), config.out)
    check_causal(engine, config.top_k, config.head, config.test_fraction, config.given)
    out = prepare_out(config.out, config)
    rows, meta = causal_rows(engine, config.top_k, config.ranks, config.positions, controls=config.controls,
                             cells=out / "cells", head=config.head,  # each finished (checkpoint, layer) kept:
                             test_fraction=config.test_fraction, given=config.given)  # a rerun resumes
    constants = dict(task=f"text: {engine.heldout.corpus}", seed=config.seed, split=POOLED)
    results = InterveneResults(config=config, table=tidy(rows, extra=CAUSAL_COLUMNS, **constants))
    finish_run(results, out, run_meta(**meta, processing_mode="raw (Hugging Face forward hooks)"))
    return results
