"""Vanilla and myopic twins: checkpoints that may be compared only if they differ in the myopic gradient alone (or,
for the multi-token twin, in its objective alone) — and the checkpoint of one twin's run that matches the other's
held-out loss, for comparisons at equal skill."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forethought.core.errors import ForethoughtError
from forethought.core.settings import UNBOUND, changed_settings, flat_defaults
from forethought.models.checkpoint import checkpoint_step, list_checkpoints
from forethought.models.families import architecture_summary
from forethought.models.heldout import token_losses
from forethought.models.lm import LMCheckpoint, LMTrainConfig, check_same_tokenizer
from forethought.models.mtp import NEXT_TOKEN, objective_heads

TWINS = ("vanilla", "myopic")


def check_twins(vanilla: LMCheckpoint, twin: LMCheckpoint, role: str = "myopic") -> None:
    """Refuse twins that differ in architecture, tokenizer, training data or settings, or that are not what they
    say; a setting one twin's run predates counts as its default. ``role`` is the second twin's: ``myopic`` (the
    negative control: trained myopically, the objective included in what must agree — a multi-token twin is not a
    vanilla one) or ``mtp`` (the positive control: trained the vanilla way with an ``mtp:K`` objective, the one
    setting it may differ in)."""
    names = ("vanilla", role)
    ours, theirs = architecture_summary(vanilla.model.config), architecture_summary(twin.model.config)
    differing = [k for k in dict.fromkeys([*ours, *theirs]) if ours.get(k) != theirs.get(k)]
    if differing:
        detail = ", ".join(f"{k} {ours.get(k)} vs {theirs.get(k)}" for k in differing)
        raise ForethoughtError(f"the twins differ in architecture: {detail}")
    check_same_tokenizer(dict(zip(names, (vanilla, twin))))
    if vanilla.data() != twin.data():
        raise ForethoughtError(f"the twins were trained on different data: {vanilla.data()} vs {twin.data()}")
    for name, checkpoint in zip(names, (vanilla, twin)):
        trained_myopic = (checkpoint.description or {}).get("myopic")
        if trained_myopic is not None and trained_myopic != (name == "myopic"):
            raise ForethoughtError(
                f"`{name}` {checkpoint.source} was trained {'myopically' if trained_myopic else 'the vanilla way'}"
            )
    if role == "mtp":
        objectives = [(c.description or {}).get("objective", NEXT_TOKEN) for c in (vanilla, twin)]
        if objectives[0] != NEXT_TOKEN or objective_heads(objectives[1]) < 2:
            raise ForethoughtError(f"`mtp` must be a multi-token twin of the vanilla one (train --objective mtp:K); "
                                   f"the vanilla twin's objective is {objectives[0]}, the other's {objectives[1]}")
    settings = [_twin_settings(checkpoint, ignored={"objective"} if role == "mtp" else set())
                for checkpoint in (vanilla, twin)]
    if None not in settings and (changed := changed_settings(*settings)):
        raise ForethoughtError(f"the twins were trained with other settings (vanilla → {role}: {changed})")
    steps = [checkpoint_step(checkpoint.source) for checkpoint in (vanilla, twin)]
    if steps[0] != steps[1]:
        planned = [(c.description or {}).get("steps") for c in (vanilla, twin)]
        detail = ", ".join(f"{name} at step {step}" + (f" of {total}" if total else "")
                           for name, step, total in zip(names, steps, planned))
        raise ForethoughtError(f"the twins are not at the same training step ({detail}): finish the shorter run, or "
                               "pass checkpoint folders of the same step")


def _twin_settings(checkpoint: LMCheckpoint, ignored: set[str]) -> dict[str, Any] | None:
    """The training settings a twin recorded (None if it records none), less what twins differ in (the myopic
    flag and cut, and ``ignored``) or what never changes the weights (where the run and its token files are kept).
    A setting the run predates counts as its default (the behaviour it had)."""
    recorded = (checkpoint.description or {}).get("train_config")
    if recorded is None:
        return None
    ignored = {"myopic", "myopic_cut", "eval_batches", *UNBOUND, *ignored}
    defaults = {k: v for k, v in flat_defaults(LMTrainConfig).items() if k not in recorded}
    return {k: v for k, v in {**recorded, **defaults}.items() if k not in ignored}


@dataclass(frozen=True)
class LossMatch:
    """The vanilla twin's saved checkpoint whose held-out loss is nearest the myopic twin's (final) loss: a
    vanilla model as good at the next token, so that a difference from the myopic twin is not merely one of skill
    (Wu et al.'s P = acc(vanilla) − acc(myopic) mixes the two)."""

    source: str  # the matched checkpoint folder
    step: int
    myopic_losses: np.ndarray  # [n, T − 1] the myopic twin's per-token held-out losses, nats (the twin matched)
    vanilla_losses: dict[int, np.ndarray]  # step → [n, T − 1]: every saved checkpoint's of the run searched
    sources: dict[int, str]  # step → the folder of each checkpoint searched
    given_step: int  # the step of the checkpoint given for the run searched (its twin: usually its last)
    target_source: str  # the folder of the twin matched

    @property
    def losses(self) -> np.ndarray:
        """The matched checkpoint's per-token losses [n, T − 1]."""
        return self.vanilla_losses[self.step]

    @property
    def given_losses(self) -> np.ndarray:
        """The per-token losses [n, T − 1] of the checkpoint given for the run searched."""
        return self.vanilla_losses[self.given_step]

    @property
    def measured(self) -> dict[str, np.ndarray]:
        """{checkpoint folder: per-token losses [n, T − 1]} of every checkpoint measured, for a next match on the
        same tokens (``loss_matched``'s ``measured``)."""
        return {self.target_source: self.myopic_losses,
                **{self.sources[step]: losses for step, losses in self.vanilla_losses.items()}}

    def record(self, searched: str = "vanilla", target: str = "myopic") -> dict[str, Any]:
        """For ``meta.json``: the match, and each candidate's mean loss (the run searched and the twin matched
        named ``searched`` and ``target``)."""
        return {"step": self.step, "source": self.source, f"{searched}_loss": float(self.losses.mean()),
                f"{target}_loss": float(self.myopic_losses.mean()),
                f"{searched}_losses_by_step": {str(step): float(losses.mean())
                                               for step, losses in self.vanilla_losses.items()}}


def loss_matched(vanilla: LMCheckpoint, myopic_twin: LMCheckpoint, tokens: torch.Tensor, batch_size: int = 32,
                 progress: bool = False, measured: dict[str, np.ndarray] | None = None) -> LossMatch:
    """Among the checkpoints the vanilla twin's run saved (``vanilla.source``'s run folder; the one given where it
    saved no other), the one whose mean held-out loss on ``tokens`` [n, T] is nearest the myopic twin's.
    ``measured``: {checkpoint folder: per-token losses [n, T − 1] on these ``tokens``} not to measure again (an
    earlier match's ``measured``)."""
    measured = dict(measured or {})
    device = next(myopic_twin.model.parameters()).device

    def losses_of(folder: Path, model: Callable[[], torch.nn.Module]) -> np.ndarray:
        if str(folder) not in measured:
            measured[str(folder)] = token_losses(model().to(device), tokens, batch_size, progress)
        return measured[str(folder)]

    target = Path(myopic_twin.source)
    myopic_losses = losses_of(target, lambda: myopic_twin.model)
    given = Path(vanilla.source)
    saved = list_checkpoints(given.parent.parent) if checkpoint_step(given) is not None else []
    candidates = {checkpoint_step(path): path for path in saved} or {checkpoint_step(given) or 0: given}
    losses = {step: losses_of(path, lambda path=path: vanilla.model if path == given else
                              LMCheckpoint.load(path).model) for step, path in candidates.items()}
    step = min(losses, key=lambda s: abs(losses[s].mean() - myopic_losses.mean()))
    return LossMatch(str(candidates[step]), step, myopic_losses, losses,
                     sources={step: str(path) for step, path in candidates.items()},
                     given_step=checkpoint_step(given) or 0, target_source=str(target))
