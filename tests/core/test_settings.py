"""List settings: typed in Python, comma-separated on the command line and in older run folders."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from forethought.core.errors import ForethoughtError
from forethought.core.settings import as_text, check_settings, from_text, list_kinds, typed_settings


@dataclass
class Lists:
    taus: tuple[int, ...] = (1, 2)
    layers: tuple[int, ...] | None = None
    names: tuple[str, ...] = ()
    checkpoints: dict[str, str] = field(default_factory=dict)
    seq_len: int = 8

    def __post_init__(self):
        check_settings(self)


def test_text_round_trips_and_names_sources():
    kinds = list_kinds(Lists)
    assert kinds == {"taus": "tuple[int, ...]", "layers": "tuple[int, ...] | None", "names": "tuple[str, ...]",
                     "checkpoints": "dict[str, str]"}  # seq_len is not a list
    for name, text in [("taus", "1,3,4"), ("names", "a,b"), ("checkpoints", "vanilla=runs/a,myopic=b/c")]:
        assert as_text(from_text(kinds[name], text, name)) == text
    assert from_text("tuple[int, ...] | None", "all", "layers") is None
    assert from_text("dict[str, str]", "runs/x, y=hub/id", "checkpoints") == {"x": "runs/x", "y": "hub/id"}
    with pytest.raises(ForethoughtError, match="taus must be comma-separated integers, got '1,x'"):
        from_text("tuple[int, ...]", "1,x", "taus")
    with pytest.raises(ForethoughtError, match="two checkpoints are named 'a'"):
        from_text("dict[str, str]", "a=x,a=y", "checkpoints")


def test_python_takes_types_and_refuses_commas_naming_the_command_line_form():
    assert Lists(taus=[3, 4], names=["a"]).taus == (3, 4)  # a list is made a tuple
    with pytest.raises(ForethoughtError, match=r"taus takes a tuple in Python, e.g. \(1, 2\); commas are for the "
                                               r"command line \(--taus 1,2\)"):
        Lists(taus="1,2")
    with pytest.raises(ForethoughtError, match=r"checkpoints takes a dict in Python"):
        Lists(checkpoints="a=b")


def test_saved_settings_come_back_typed_from_json_and_from_older_text():
    saved = {"taus": [1, 2], "layers": None, "names": ["a"], "checkpoints": {"a": "b"}, "seq_len": 8}
    assert Lists(**typed_settings(Lists, saved)) == Lists(taus=(1, 2), names=("a",), checkpoints={"a": "b"})
    older = {"taus": "1,2", "layers": "all", "names": "a", "checkpoints": "a=b", "seq_len": 8}
    assert typed_settings(Lists, older) == typed_settings(Lists, saved)
    assert typed_settings(Lists, {"gone": "1,2"}) == {"gone": "1,2"}  # not a field: left as it was
