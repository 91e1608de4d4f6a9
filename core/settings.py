"""The range of every numeric setting, in one table, checked in full before a run writes anything; the one
place list settings meet text (comma-separated on the command line and in run folders written before they were
typed); and nested settings (a config holding a settings dataclass, such as its training settings), which the
command line, presets and run folders name flat.

A setting means the same thing in every config that has it (``steps``, ``lr``, ``seq_len`` …), so one table
keyed by field name serves every config dataclass: its ``__post_init__`` calls :func:`check_settings`. Every
float must be finite; ``None`` (where a field allows it) means "not set" and is not checked. A test keeps the
table complete: every int or float field of every command's config has a rule here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any, ClassVar

from forethought.core.errors import ForethoughtError
from forethought.core.files import atomic_write_json, read_json

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
SEED: Rule = ("≥ 0 and < 2³²", lambda v: 0 <= v < 2**32)  # seeds are combined and offset (torch takes < 2⁶⁴)
LARGEST = 2**31  # every other integer setting stays below it: a size, a count or a step beyond it is a typo, and
# past 2⁶³ numpy and torch fail with tracebacks of their own

RULES: dict[str, Rule] = {
    # sizes of data and models
    "seq_len": AT_LEAST_2, "n_layer": AT_LEAST_1, "d_model": AT_LEAST_1, "n_head": AT_LEAST_1,
    "vocab_size": AT_LEAST_2, "max_documents": AT_LEAST_1, "n_terms": AT_LEAST_1, "degree": AT_LEAST_2,
    "length": AT_LEAST_2, "n_nodes": AT_LEAST_2, "n_train": AT_LEAST_1, "n_test": AT_LEAST_1,
    "heldout_sequences": AT_LEAST_1, "max_sequences": AT_LEAST_1, "n_sequences": AT_LEAST_1,
    "share_sequences": AT_LEAST_1, "eval_samples": AT_LEAST_1, "probe_samples": AT_LEAST_1,
    "batch_sequences": AT_LEAST_1, "classes": AT_LEAST_2, "top_k": AT_LEAST_1, "hidden": AT_LEAST_1,
    "horizon": AT_LEAST_1,
    # the synthetic task
    "p": PROBABILITY, "freq": POSITIVE,
    # optimisation
    "steps": AT_LEAST_1, "epochs": POSITIVE, "batch_size": AT_LEAST_1, "lr": POSITIVE, "weight_decay": NON_NEGATIVE,
    "warmup_frac": HALF_OPEN_UNIT, "grad_clip": NON_NEGATIVE, "dropout": HALF_OPEN_UNIT, "seed": SEED,
    "split_seed": SEED, "eval_every": AT_LEAST_1, "eval_batches": AT_LEAST_1, "checkpoint_every": AT_LEAST_1,
    "keep_checkpoints": AT_LEAST_1,
    # probes
    "max_epochs": AT_LEAST_1, "patience": NON_NEGATIVE, "ridge_alpha": NON_NEGATIVE, "test_fraction": OPEN_UNIT,
    "probe_test_fraction": OPEN_UNIT, "validation_fraction": OPEN_UNIT, "sklearn_max_iter": AT_LEAST_1,
    "show": NON_NEGATIVE, "positions": AT_LEAST_1, "tau": AT_LEAST_1, "head": AT_LEAST_1, "given": NON_NEGATIVE,
    # benchmarks
    "rounds": AT_LEAST_1, "warmup": NON_NEGATIVE,
}


def check_settings(config: Any, overrides: dict[str, Rule] | None = None) -> None:
    """Refuse, in one line naming the setting, any numeric field of the dataclass ``config`` that is not finite
    or outside its range in :data:`RULES` (``overrides`` replace rules for this config), any integer from
    :data:`LARGEST` up but a seed, and any text field left empty; also ``n_head`` not dividing ``d_model``, and a
    ``device`` that is not there."""
    rules = {**RULES, **(overrides or {})}
    for field in fields(config):
        value = getattr(config, field.name)
        if isinstance(value, str) and not value.strip():  # '' would mean the current folder, or every file
            raise ForethoughtError(f"{field.name} is empty: give a value or leave the setting out")
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ForethoughtError(f"{field.name} must be a finite number, got {value}")
        if field.name in rules and not rules[field.name][1](value):
            raise ForethoughtError(f"{field.name} must be {rules[field.name][0]}, got {value}")
        if isinstance(value, int) and value >= LARGEST and rules.get(field.name) is not SEED:
            raise ForethoughtError(f"{field.name} must be < 2³¹, got {value}")
    d_model, n_head = getattr(config, "d_model", None), getattr(config, "n_head", None)
    if d_model is not None and n_head is not None and d_model % n_head:
        raise ForethoughtError(f"n_head {n_head} does not divide d_model {d_model}")
    if isinstance(getattr(config, "device", None), str):
        check_device(config.device)
    for name in ("out", "figures_dir", "tokens_root"):  # folders written into: refused before any work if files
        value = getattr(config, name, None)
        if isinstance(value, str) and Path(value).exists() and not Path(value).is_dir():
            raise ForethoughtError(f"`{name}` {value} is a file, not a folder")
    check_lists(config)
    taus = getattr(config, "taus", None)
    if taus is not None and (not taus or min(taus) < 1):
        raise ForethoughtError(f"taus must be offsets ≥ 1, got {as_text(taus) or 'none'}")


def check_device(name: str) -> None:
    """Refuse a device torch cannot name or this machine does not have (``auto`` always works)."""
    if name == "auto":
        return
    import torch  # here, not above: the command line reads its settings before torch loads

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
    parts = [part.strip() for part in text.split(",")]
    if kind.startswith("tuple[int") and kind.endswith("None") and text.strip() == "all":
        return None
    if "" in parts:
        raise ForethoughtError(f"{name} has an empty item in {text!r}: lists take single commas, e.g. 1,2")
    if kind.startswith("tuple[int"):
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
        value = _typed(kind, value)
        if isinstance(value, tuple):
            repeated = next((item for index, item in enumerate(value) if item in value[:index]), None)
            if repeated is not None:
                raise ForethoughtError(f"{name} lists {repeated!r} twice")
            if any(isinstance(item, str) and not item.strip() for item in value):
                raise ForethoughtError(f"{name} has an empty item")
        object.__setattr__(config, name, value)


def _typed(kind: str, value: Any) -> Any:
    """A list setting's value (a list, tuple or dict) as its ``kind`` holds it."""
    return dict(value) if kind.startswith("dict") else tuple(value)


# ---- nested settings: a config may hold settings dataclasses as fields (``training: TrainSettings``); presets, the
# command line and run folders name their fields flat (``lr``, ``--lr``), as if the config declared them itself

def nested_settings(config_class: type) -> dict[str, type]:
    """{field name: settings dataclass} of the fields of ``config_class`` that hold settings dataclasses."""
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in fields(config_class) if dataclasses.is_dataclass(hints[f.name])}


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default (its factory called); None for a field without one."""
    return f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else None


def flat_settings(config: Any) -> dict[str, Any]:
    """The settings of the dataclass ``config`` by flat name: a nested settings object's fields in its place."""
    nested, flat = nested_settings(type(config)), {}
    for name, value in asdict(config).items():
        flat.update(value if name in nested else {name: value})
    return flat


def flat_defaults(config_class: type) -> dict[str, Any]:
    """Every flat setting's default, as ``config.json`` holds it: what a run made before the setting existed had."""
    nested, defaults = nested_settings(config_class), {}
    for f in fields(config_class):
        default = field_default(f)
        defaults.update(asdict(default) if f.name in nested else {f.name: default})
    return _as_json(defaults)


def build_config(config_class: type, settings: dict[str, Any]) -> Any:
    """The dataclass ``config_class`` from flat ``settings`` (a setting of a nested object changes that one
    setting of the field's default object, which validates itself); refuses names it does not have."""
    nested = nested_settings(config_class)
    owners = {g.name: name for name, kind in nested.items() for g in fields(kind)}
    own = {f.name for f in fields(config_class)} - set(nested)
    unknown = sorted(set(settings) - own - set(owners))
    if unknown:
        raise ForethoughtError(f"unknown settings {unknown}")
    values = {name: value for name, value in settings.items() if name in own}
    for name in nested:
        if changes := {key: value for key, value in settings.items() if owners.get(key) == name}:
            default = field_default(next(f for f in fields(config_class) if f.name == name))
            values[name] = dataclasses.replace(default, **changes)
    return config_class(**values)


class Presets:
    """Mixin of configs with named starting values: ``PRESETS`` {name: flat settings}; the config's ``preset``
    field records which one a run started from."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def from_settings(cls, **settings: Any):
        """The config from flat settings (``lr=…`` reaches the training settings), as the command line gives them."""
        return build_config(cls, settings)

    @classmethod
    def from_preset(cls, name: str, **settings: Any):
        """The preset's values, then ``settings`` (flat names)."""
        check_preset(cls, name)
        return build_config(cls, {**cls.PRESETS[name], **settings, "preset": name})


def check_preset(config_class: type, name: str | None) -> None:
    """Refuse a preset name that ``config_class.PRESETS`` lacks (None: no preset)."""
    if name is not None and name not in config_class.PRESETS:
        raise ForethoughtError(f"unknown preset {name!r}; choose one of {', '.join(config_class.PRESETS)}")


# ---- a run folder's settings: the ones that bind it, recorded once and checked on every later run

def bound_settings(config: Any) -> dict[str, Any]:
    """The flat settings that bind a run folder, as JSON holds them: all but :data:`UNBOUND` and the nested
    settings' ``RESUMABLE`` ones (how often to evaluate or checkpoint, compile: a resume may change them)."""
    free = {*UNBOUND, *(name for kind in nested_settings(type(config)).values()
                       for name in getattr(kind, "RESUMABLE", ()))}
    return _as_json({k: v for k, v in flat_settings(config).items() if k not in free})


def changed_settings(saved: dict[str, Any], wanted: dict[str, Any], defaults: dict[str, Any] | None = None) -> str:
    """``"key: old → new"`` for each setting in which a run folder's ``saved`` settings differ from ``wanted``
    ("" if none). A key the saved run lacks counts as ``defaults[key]``: a setting the workbench gained after
    the run was made, whose default keeps the behaviour the run had."""
    defaults = defaults or {}
    keys = dict.fromkeys([*saved, *wanted])
    return ", ".join(f"{key}: {saved.get(key, defaults.get(key))!r} → {wanted.get(key)!r}" for key in keys
                     if saved.get(key, defaults.get(key)) != wanted.get(key))


ANALYSIS_SETTINGS, TRAINING_SETTINGS = "config.json", "train_config.json"  # where a run folder keeps its settings
SETTINGS_FILES = (ANALYSIS_SETTINGS, TRAINING_SETTINGS)


def record_settings(settings_file: Path, config: Any) -> dict[str, Any]:
    """Write ``config``'s :func:`bound_settings` to ``settings_file`` (atomically) and return them, or refuse,
    changing nothing, where :func:`check_recorded_settings` does."""
    settings = check_recorded_settings(settings_file, config)
    settings_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(settings_file, settings)
    return settings


def check_recorded_settings(settings_file: Path, config: Any) -> dict[str, Any]:
    """``config``'s :func:`bound_settings`, refused (naming the settings) if ``settings_file`` holds others (a
    setting it lacks counts as its default; settings it holds that no longer bind are ignored), or if its folder
    holds a run of another command (the other of :data:`SETTINGS_FILES`, or settings this config does not have).
    Writes nothing: a command checks its folder with it before work that takes time."""
    settings, config_class = bound_settings(config), type(config)
    folder = settings_file.parent
    other = next((name for name in SETTINGS_FILES if name != settings_file.name and (folder / name).exists()), None)
    if other:
        raise ForethoughtError(f"`out` {folder} holds a run of another command (its {other}); choose another `out`")
    if settings_file.exists():
        saved = read_json(settings_file, f"remove {folder} to start afresh")
        defaults = flat_defaults(config_class)
        if foreign := sorted(set(saved) - set(defaults)):
            raise ForethoughtError(f"`out` {folder} holds a run of another command or an older workbench (settings "
                                   f"{', '.join(foreign[:3])}{' …' if len(foreign) > 3 else ''} are not this "
                                   "command's); choose another `out`")
        free = set(defaults) - set(settings)
        saved = _as_json(typed_settings(config_class, {k: v for k, v in saved.items() if k not in free}))
        if changed := changed_settings(saved, settings, defaults):
            raise ForethoughtError(f"`out` {settings_file.parent} holds a run with other settings ({changed}); "
                                   "choose another `out`")
    return settings


def _as_json(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as a JSON file holds them (tuples become lists), so saved and wanted compare equal."""
    return json.loads(json.dumps(settings))
