"""The range of every numeric setting, in one table, checked in full before a run writes anything; and the one
place list settings meet text (comma-separated on the command line and in run folders written before they were
typed).

A setting means the same thing in every config that has it (``steps``, ``lr``, ``seq_len`` …), so one table
keyed by field name serves every config dataclass: its ``__post_init__`` calls :func:`check_settings`. Every
float must be finite; ``None`` (where a field allows it) means "not set" and is not checked. A test keeps the
table complete: every int or float field of every command's config has a rule here.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from forethought.core.errors import ForethoughtError

UNBOUND = ("out", "figures_dir", "device", "progress", "tokens_root", "show")  # where a run is kept and how it reports:
# never part of a run's identity

Rule = tuple[str, Callable[[Any], bool]]  # (the range in words, the test)

AT_LEAST_1: Rule = ("≥ 1", lambda v: v >= 1)
AT_LEAST_2: Rule = ("≥ 2", lambda v: v >= 2)
POSITIVE: Rule = ("> 0", lambda v: v > 0)
NON_NEGATIVE: Rule = ("≥ 0", lambda v: v >= 0)
OPEN_UNIT: Rule = ("in (0, 1)", lambda v: 0 < v < 1)
HALF_OPEN_UNIT: Rule = ("in [0, 1)", lambda v: 0 <= v < 1)
PROBABILITY: Rule = ("in [0, 1]", lambda v: 0 <= v <= 1)

RULES: dict[str, Rule] = {
    # sizes of data and models
    "seq_len": AT_LEAST_2, "n_layer": AT_LEAST_1, "d_model": AT_LEAST_1, "n_head": AT_LEAST_1,
    "vocab_size": AT_LEAST_2, "max_documents": AT_LEAST_1, "n_terms": AT_LEAST_1, "degree": AT_LEAST_2,
    "length": AT_LEAST_2, "n_nodes": AT_LEAST_2, "n_train": AT_LEAST_1, "n_test": AT_LEAST_1,
    "heldout_sequences": AT_LEAST_1, "max_sequences": AT_LEAST_1, "n_sequences": AT_LEAST_1,
    "share_sequences": AT_LEAST_1, "eval_samples": AT_LEAST_1, "probe_samples": AT_LEAST_1,
    "batch_sequences": AT_LEAST_1, "classes": AT_LEAST_2, "top_k": AT_LEAST_1, "horizon": AT_LEAST_1,
    # the synthetic task
    "p": PROBABILITY, "freq": POSITIVE,
    # optimisation
    "steps": AT_LEAST_1, "epochs": POSITIVE, "batch_size": AT_LEAST_1, "lr": POSITIVE, "weight_decay": NON_NEGATIVE,
    "warmup_frac": HALF_OPEN_UNIT, "grad_clip": NON_NEGATIVE, "dropout": HALF_OPEN_UNIT, "seed": NON_NEGATIVE,
    "split_seed": NON_NEGATIVE, "eval_every": AT_LEAST_1, "eval_batches": AT_LEAST_1, "checkpoint_every": AT_LEAST_1,
    "keep_checkpoints": AT_LEAST_1,
    # probes
    "max_epochs": AT_LEAST_1, "patience": NON_NEGATIVE, "ridge_alpha": NON_NEGATIVE, "test_fraction": OPEN_UNIT,
    "probe_test_fraction": OPEN_UNIT, "validation_fraction": OPEN_UNIT, "sklearn_max_iter": AT_LEAST_1,
    "show": NON_NEGATIVE,
    # benchmarks
    "rounds": AT_LEAST_1, "warmup": NON_NEGATIVE,
}


def check_settings(config: Any, overrides: dict[str, Rule] | None = None) -> None:
    """Refuse, in one line naming the setting, any numeric field of the dataclass ``config`` that is not finite
    or outside its range in :data:`RULES` (``overrides`` replace rules for this config); also ``n_head`` not
    dividing ``d_model``, and a ``device`` that is not there."""
    rules = {**RULES, **(overrides or {})}
    for field in fields(config):
        value = getattr(config, field.name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ForethoughtError(f"{field.name} must be a finite number, got {value}")
        if field.name in rules and not rules[field.name][1](value):
            raise ForethoughtError(f"{field.name} must be {rules[field.name][0]}, got {value}")
    d_model, n_head = getattr(config, "d_model", None), getattr(config, "n_head", None)
    if d_model is not None and n_head is not None and d_model % n_head:
        raise ForethoughtError(f"n_head {n_head} does not divide d_model {d_model}")
    if isinstance(getattr(config, "device", None), str):
        check_device(config.device)
    check_lists(config)


def check_device(name: str) -> None:
    """Refuse a device torch cannot name or this machine does not have (``auto`` always works)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ForethoughtError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0 or (device.index or 0) >= available:
            raise ForethoughtError(f"device {name!r} is not there (this machine has {available} CUDA devices)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ForethoughtError(f"device {name!r} is not there (no Apple GPU)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ForethoughtError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")


# ---- list settings: typed in Python (tuples, {name: source}), comma-separated on the command line

LIST_KINDS = {  # the annotations of list settings → how the command line writes them (an int list's None: 'all')
    "tuple[int, ...]": "INT,…", "tuple[int, ...] | None": "INT,…|all", "tuple[str, ...]": "STR,…",
    "tuple[str, ...] | None": "STR,…", "dict[str, str]": "NAME=SOURCE,…",
}


def list_kinds(config_class: type) -> dict[str, str]:
    """{field name: annotation} of the list settings (:data:`LIST_KINDS`) of the dataclass ``config_class``."""
    kinds = {}
    for f in fields(config_class):
        annotation = f.type if isinstance(f.type, str) else str(typing.get_type_hints(config_class)[f.name])
        if annotation in LIST_KINDS:
            kinds[f.name] = annotation
    return kinds


def from_text(kind: str, text: str, name: str) -> Any:
    """Command-line text → a list setting of ``kind``: ``"1,2"`` → (1, 2); ``"all"`` → None (int lists that
    allow it); ``"a,b"`` → ("a", "b"); ``"NAME=SOURCE,SOURCE"`` → {NAME: SOURCE, folder name: SOURCE}."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if kind.startswith("tuple[int"):
        if kind.endswith("None") and text.strip() == "all":
            return None
        try:
            return tuple(int(part) for part in parts)
        except ValueError:
            raise ForethoughtError(f"{name} must be comma-separated integers, got {text!r}") from None
    if kind.startswith("tuple[str"):
        return tuple(parts)
    named: dict[str, str] = {}
    for part in parts:
        key, _, source = part.rpartition("=") if "=" in part else (Path(part).name, "", part)
        if key in named:
            raise ForethoughtError(f"two checkpoints are named {key!r}; name them NAME=PATH")
        named[key] = source
    return named


def as_text(value: Any) -> str:
    """A list setting as the command line writes it (the inverse of :func:`from_text`)."""
    if isinstance(value, dict):
        return ",".join(f"{name}={source}" for name, source in value.items())
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def typed_settings(config_class: type, saved: dict[str, Any]) -> dict[str, Any]:
    """Settings as a run folder saved them (JSON) → the config's types: lists become tuples, and a comma string
    (run folders written before list settings were typed) is read as the command line would."""
    kinds = list_kinds(config_class)
    return {name: value if name not in kinds or value is None
            else from_text(kinds[name], value, name) if isinstance(value, str) else _typed(kinds[name], value)
            for name, value in saved.items()}


def check_lists(config: Any) -> None:
    """Refuse, in one line, a list setting given as text in Python (commas are for the command line); make
    lists tuples."""
    for name, kind in list_kinds(type(config)).items():
        value = getattr(config, name)
        if value is None:
            continue
        if isinstance(value, str):
            example = "{'name': 'path'}" if kind.startswith("dict") else "(1, 2)" if "int" in kind else "('a', 'b')"
            raise ForethoughtError(f"{name} takes a {'dict' if kind.startswith('dict') else 'tuple'} in Python, "
                                   f"e.g. {example}; commas are for the command line (--{name.replace('_', '-')} "
                                   f"{as_text(from_text(kind, value, name))})")
        object.__setattr__(config, name, _typed(kind, value))


def _typed(kind: str, value: Any) -> Any:
    """A list setting's value (a list, tuple or dict) as its ``kind`` holds it."""
    return dict(value) if kind.startswith("dict") else tuple(value)
