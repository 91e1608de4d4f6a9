"""Checkpoints: a ``save_pretrained`` folder plus ``training_state.pt``, written atomically.

Layout of a run folder::

    <run>/checkpoints/step-0000500/   config.json, model.safetensors, training_state.pt
    <run>/checkpoints/step-0001000/

A checkpoint is written to ``step-N.tmp-PID``, fsynced and renamed into place, so a crash never leaves a folder
that looks complete; leftover ``.tmp-PID`` folders are ignored (only ``step-N`` folders count). Weights that are not
all finite are never saved, and the disk's free space is checked first. Every file's content digest is recorded
(``digests.json``) and checked before a resume or a load: a damaged checkpoint is named, never used.
``training_state.pt`` is read with ``torch.load(weights_only=True)``: tensors and plain containers only, so a
planted pickle never runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from forethought.core.errors import ForethoughtError, one_line
from forethought.core.files import (
    check_folder_digests,
    check_free_space,
    remove_path,
    staged_folder,
    write_folder_digests,
)
from forethought.models.gpt2 import quiet_loading
from forethought.models.mtp import save_heads, without_heads

STATE_FILE = "training_state.pt"
_STEP_FOLDER = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


@quiet_loading()
def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: PreTrainedModel,
    state: dict[str, Any],
    keep: int = 2,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write model + training state for ``step`` atomically; keep only the newest ``keep`` checkpoints.

    ``extra(folder)`` writes further files (tokenizer, data description) into the folder before it is final. A
    multi-token model's extra heads go beside the model (:mod:`models.mtp`): ``model.safetensors`` stays an
    ordinary causal LM.
    """
    folder = checkpoints_dir(run_dir) / f"step-{step:07d}"
    check_finite_weights(model, f"step {step} of {run_dir}")
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    check_free_space(folder.parent, 3 * n_bytes + 2**24, f"checkpoint {folder.name}")  # weights + AdamW moments
    with staged_folder(folder) as staging:  # re-saving a step (the final one after a resume) replaces it whole
        with without_heads(model) as heads:
            model.save_pretrained(staging)
        if heads is not None:
            save_heads(heads, staging)
        torch.save(state, staging / STATE_FILE)
        if extra is not None:
            extra(staging)
        write_folder_digests(staging)  # checked before any resume or load (check_checkpoint)
    for old in list_checkpoints(run_dir)[:-keep]:
        remove_path(old)
    return folder


def check_checkpoint(folder: str | Path) -> None:
    """Refuse a checkpoint whose files changed since it was written (content digests, ``digests.json``), naming
    the file: a damaged checkpoint is never resumed from or loaded. Checkpoints written before digests were
    recorded have none and are read as they are."""
    folder = Path(folder)
    check_folder_digests(folder, f"remove {folder} to resume from the checkpoint before it, or train again")


def check_finite_weights(model: PreTrainedModel, what: str) -> None:
    """Refuse to save weights holding NaN or ±inf (a diverged step), naming the first such tensor."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ForethoughtError(f"not saving {what}: {name} holds NaN or infinite weights")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_FOLDER.match(p.name))]
    return [path for _, path in sorted(found)]


def checkpoint_step(folder: str | Path) -> int | None:
    """The training step of a checkpoint folder (``step-N``); None for anything else (a hub model)."""
    match = _STEP_FOLDER.match(Path(folder).name)
    return int(match.group(1)) if match else None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def load_training_state(folder: str | Path) -> dict[str, Any]:
    """The optimizer/scheduler/RNG state saved beside a checkpoint's weights."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise ForethoughtError(f"checkpoint {folder} has no {STATE_FILE}; it cannot be resumed")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # truncated, not a torch file, or holding objects weights_only refuses
        reason = one_line(error, 200)
        raise ForethoughtError(f"cannot read {path} (damaged, or not a training state this workbench wrote: "
                               f"{reason})") from None


def training_history(folder: str | Path) -> list[dict[str, float]]:
    """The loss history saved with a checkpoint ({"step", "train_loss"[, "eval_loss"]} per step); empty for a
    model that was not trained by :func:`models.train.train` (a hub model, a bare folder)."""
    return load_training_state(folder).get("history", []) if (Path(folder) / STATE_FILE).is_file() else []
