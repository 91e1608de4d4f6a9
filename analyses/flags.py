"""Command-line flags from config dataclasses: one ``--flag`` per field (a nested settings field, such as
``training``, gives one per field of its class, by the flat name), described as data (:class:`FlagSpec`) so that
the command line builds its parser from ``cli.json`` without importing the classes, torch or transformers.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import re
from dataclasses import Field, fields
from typing import Any, NamedTuple

from forethought.core.errors import ForethoughtError, as_flags
from forethought.core.settings import LIST_KINDS, as_text, field_default, from_text, list_kinds, nested_settings

SCALARS = {"int": int, "float": float, "str": str}


class FlagSpec(NamedTuple):
    """One flag, as ``cli.json`` keeps it (a JSON list)."""

    flag: str  # "--n-terms"
    dest: str  # "n_terms": the config's (flat) setting
    kind: str  # "bool", "int", "float", "str", or a list kind of core.settings.LIST_KINDS
    help: str  # the field's comment, then its default (or each preset's value where they differ)


def flag_specs(cls: type, skip: tuple[str, ...] = (), presets: dict[str, dict] | None = None) -> list[FlagSpec]:
    """The flags of the config dataclass ``cls``, its own fields first; ``skip``: fields that are not flags.
    With ``presets``, the help shows each preset's value where one differs from the class default."""
    specs, entries = [], _fields(cls)
    names = {f.name for f, *_ in entries if f.name not in skip}  # `seq_len` in a comment: --seq-len in the help
    for f, default, helps, listed in entries:
        if f.name in skip:
            continue
        annotation = str(f.type)
        kind = "bool" if annotation == "bool" else listed or next(
            (name for name in SCALARS if annotation.startswith(name)), "str")
        values = {name: preset.get(f.name, default) for name, preset in (presets or {"": {}}).items()}
        texts = {name: _default_text(value, listed) for name, value in values.items()}
        described = helps.get(f.name, "")
        if len(set(texts.values())) > 1:
            described += f" ({', '.join(f'{name}: {text}' for name, text in texts.items())})"
        elif "(default" not in described:  # a comment may say its default in words: "(default: all)"
            described += f" (default: {next(iter(texts.values()))})"
        help_text = as_flags(described.strip(), names).replace("%", "%%")  # argparse formats help
        specs.append(FlagSpec("--" + f.name.replace("_", "-"), f.name, kind, help_text))
    return specs


def add_flags(parser: argparse.ArgumentParser, specs: list[FlagSpec]) -> None:
    """Add ``specs`` to ``parser``; flags left out are absent from the parsed namespace."""
    for spec in specs:
        options: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": spec.dest, "help": spec.help}
        if spec.kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif spec.kind in LIST_KINDS:
            options["type"] = functools.partial(_list_from_text, spec.kind, spec.dest)
            options["metavar"] = LIST_KINDS[spec.kind]
        else:
            options["type"], options["metavar"] = SCALARS[spec.kind], spec.kind.upper()
        parser.add_argument(spec.flag, **options)


def _fields(cls: type) -> list[tuple[Field, Any, dict[str, str], str | None]]:
    """(field, default, helps, list kind) of each flag of ``cls``, its own fields first; a nested settings field
    gives one entry per field of its class in its place, with ``cls``'s default for it."""
    nested, lists, helps, entries = nested_settings(cls), list_kinds(cls), _field_help(cls), []
    for f in _own_fields_first(cls):
        default = field_default(f)
        if f.name in nested:
            nested_helps = _field_help(nested[f.name])
            entries += [(g, getattr(default, g.name), nested_helps, None) for g in fields(nested[f.name])]
        else:
            entries.append((f, default, helps, lists.get(f.name)))
    return entries


def _field_help(cls: type) -> dict[str, str]:
    """Help for each field, from the comment after it in the source of the class (or a base class)."""
    helps: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if k is not object and "__dataclass_fields__" in vars(k)]):
        source = inspect.getsource(klass)
        helps.update(re.findall(r"^\s+(\w+): [^=\n]+= [^#\n]+#\s*(.+)$", source, flags=re.MULTILINE))
    return helps


def _own_fields_first(cls: type) -> list[Field]:
    """The dataclass's fields, those a class declares itself before those it inherits (``--checkpoints`` before
    the shared probe settings)."""
    order = [name for klass in cls.__mro__ for name in vars(klass).get("__annotations__", {})]
    return sorted(fields(cls), key=lambda f: order.index(f.name))


def _list_from_text(kind: str, name: str, text: str) -> object:
    """A list flag's value (:func:`core.settings.from_text`); a bad one is the parser's one-line error."""
    try:
        return from_text(kind, text, name)
    except ForethoughtError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _default_text(value: object, listed: str | None) -> str:
    """A default as the command line writes it: 'on' / 'off' for a switch, 'none' for no value or an empty
    list, 'all' for an int list's None."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == "":
        return "all" if value is None and listed is not None and listed.startswith("tuple[int") else "none"
    if listed is None:
        return str(value)
    return as_text(value) or "none"
