"""Vanilla and myopic twins: checkpoints that may be compared only if they differ in the myopic gradient alone."""

from __future__ import annotations

from typing import Any

from forethought.core.errors import ForethoughtError
from forethought.core.settings import UNBOUND, changed_settings
from forethought.models.checkpoint import checkpoint_step
from forethought.models.families import architecture_summary
from forethought.models.lm import LMCheckpoint, check_same_tokenizer

TWINS = ("vanilla", "myopic")


def check_twins(vanilla: LMCheckpoint, myopic_twin: LMCheckpoint) -> None:
    """Refuse twins that differ in architecture, tokenizer or training data, or that are not what they say."""
    ours, theirs = architecture_summary(vanilla.model.config), architecture_summary(myopic_twin.model.config)
    differing = [k for k in dict.fromkeys([*ours, *theirs]) if ours.get(k) != theirs.get(k)]
    if differing:
        detail = ", ".join(f"{k} {ours.get(k)} vs {theirs.get(k)}" for k in differing)
        raise ForethoughtError(f"the twins differ in architecture: {detail}")
    check_same_tokenizer({"vanilla": vanilla, "myopic": myopic_twin})
    if vanilla.data() != myopic_twin.data():
        raise ForethoughtError(f"the twins were trained on different data: {vanilla.data()} vs {myopic_twin.data()}")
    for name, checkpoint in zip(TWINS, (vanilla, myopic_twin)):
        trained_myopic = (checkpoint.description or {}).get("myopic")
        if trained_myopic is not None and trained_myopic != (name == "myopic"):
            raise ForethoughtError(
                f"--{name} {checkpoint.source} was trained {'myopically' if trained_myopic else 'the vanilla way'}"
            )
    settings = [_twin_settings(checkpoint) for checkpoint in (vanilla, myopic_twin)]
    if None not in settings and (changed := changed_settings(*settings)):
        raise ForethoughtError(f"the twins were trained with other settings (vanilla → myopic: {changed})")
    steps = [checkpoint_step(checkpoint.source) for checkpoint in (vanilla, myopic_twin)]
    if steps[0] != steps[1]:
        planned = [(c.description or {}).get("steps") for c in (vanilla, myopic_twin)]
        detail = ", ".join(f"{name} at step {step}" + (f" of {total}" if total else "")
                           for name, step, total in zip(TWINS, steps, planned))
        raise ForethoughtError(f"the twins are not at the same training step ({detail}): finish the shorter run, or "
                               "pass checkpoint folders of the same step")


def _twin_settings(checkpoint: LMCheckpoint) -> dict[str, Any] | None:
    """The training settings a twin recorded (None if it records none), less what twins differ in or what never
    changes the weights (the myopic flag and cut; where the run and its token files are kept)."""
    recorded = (checkpoint.description or {}).get("train_config")
    ignored = {"myopic", "myopic_cut", "eval_batches", *UNBOUND}
    return None if recorded is None else {k: v for k, v in recorded.items() if k not in ignored}
