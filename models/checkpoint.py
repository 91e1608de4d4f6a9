"""Checkpoints: a ``save_pretrained`` folder plus ``training_state.pt``, written atomically.

Layout of a run folder::

    <run>/checkpoints/step-0000500/   config.json, model.safetensors, training_state.pt
    <run>/checkpoints/step-0001000/

A checkpoint is written to ``step-N.tmp`` and renamed into place, so a crash never leaves a folder that
looks complete; leftover ``.tmp`` folders are ignored and cleared by the next save.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from models.errors import ForethoughtError
from models.gpt2 import quiet_loading

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

    ``extra(folder)`` writes further files (tokenizer, data description) into the folder before it is final.
    """
    folder = checkpoints_dir(run_dir) / f"step-{step:07d}"
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    torch.save(state, staging / STATE_FILE)
    if extra is not None:
        extra(staging)
    if folder.exists():  # re-saving a step (e.g. the final one after a resume): replace it whole
        shutil.rmtree(folder)
    os.replace(staging, folder)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return folder


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_FOLDER.match(p.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def load_training_state(folder: str | Path) -> dict[str, Any]:
    """The optimizer/scheduler/RNG state saved beside a checkpoint's weights."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise ForethoughtError(f"checkpoint {folder} has no {STATE_FILE}; it cannot be resumed")
    try:
        return torch.load(path, weights_only=False, map_location="cpu")
    except Exception as error:  # truncated or not a torch file
        raise ForethoughtError(f"cannot read {path}: {error}") from error


def changed_settings(saved: dict[str, Any], wanted: dict[str, Any], defaults: dict[str, Any] | None = None) -> str:
    """``"key: old → new"`` for each setting in which a run folder's ``saved`` settings differ from ``wanted``
    ("" if none). A key the saved run lacks counts as ``defaults[key]``: a setting the workbench gained after
    the run was made, whose default keeps the behaviour the run had."""
    defaults = defaults or {}
    keys = dict.fromkeys([*saved, *wanted])
    return ", ".join(f"{key}: {saved.get(key, defaults.get(key))!r} → {wanted.get(key)!r}" for key in keys
                     if saved.get(key, defaults.get(key)) != wanted.get(key))


def size_text(n_bytes: float) -> str:
    """``n_bytes`` readably: ``"12 KiB"``, ``"340 MiB"``, ``"3.40 GiB"``."""
    if n_bytes < 2**20:
        return f"{n_bytes / 2**10:.0f} KiB"
    return f"{n_bytes / 2**20:.0f} MiB" if n_bytes < 2**30 else f"{n_bytes / 2**30:.2f} GiB"


def check_free_space(folder: str | Path, needed: int, what: str) -> None:
    """Refuse before writing when the disk holding ``folder`` (or its nearest existing parent) has less than
    ``needed`` bytes free; ``what`` names the job in the message."""
    existing = next(p for p in [Path(folder), *Path(folder).absolute().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ForethoughtError(f"{what} needs about {size_text(needed)} in {folder}; only {size_text(free)} free")
