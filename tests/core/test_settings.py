"""List settings (typed in Python, comma-separated on the command line and in older run folders); nested settings
(named flat); the settings that bind a run folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from forethought.core.errors import ForethoughtError
from forethought.core.settings import (
    Presets,
    as_text,
    bound_settings,
    build_config,
    check_settings,
    flat_defaults,
    flat_settings,
    from_text,
    list_kinds,
    nested_settings,
    record_settings,
    typed_settings,
)


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


@dataclass
class Inner:
    lr: float = 1e-3
    steps_between: int = 5

    RESUMABLE = ("steps_between",)

    def __post_init__(self):
        check_settings(self, {"steps_between": ("≥ 1", lambda v: v >= 1)})


@dataclass
class Outer(Presets):
    seq_len: int = 8
    inner: Inner = field(default_factory=lambda: Inner(lr=0.5))  # the outer config's own default for it
    out: str = "runs/x"
    preset: str | None = None

    PRESETS = {"small": {"seq_len": 4, "lr": 0.25}}


def test_nested_settings_are_named_flat_and_keep_the_configs_defaults():
    assert nested_settings(Outer) == {"inner": Inner}
    config = Outer.from_settings(lr=0.1)
    assert config.inner == Inner(lr=0.1, steps_between=5)
    assert Outer.from_settings(steps_between=2).inner == Inner(lr=0.5, steps_between=2)  # the rest: Outer's default
    assert flat_settings(config) == {"seq_len": 8, "lr": 0.1, "steps_between": 5, "out": "runs/x",
                                    "preset": None}
    assert build_config(Outer, flat_settings(config)) == config  # round trip
    assert flat_defaults(Outer) == {"seq_len": 8, "lr": 0.5, "steps_between": 5, "out": "runs/x",
                                     "preset": None}
    preset = Outer.from_preset("small", lr=0.125)
    assert (preset.seq_len, preset.inner.lr) == (4, 0.125)  # the flags given override the preset
    # neither where it is kept nor the resumable settings bind a run folder
    assert bound_settings(preset) == {"seq_len": 4, "lr": 0.125, "preset": "small"}
    with pytest.raises(ForethoughtError, match=r"unknown settings \['learning_rate'\]"):
        Outer.from_settings(learning_rate=0.1)
    with pytest.raises(ForethoughtError, match="unknown preset 'big'; choose one of small"):
        Outer.from_preset("big")
    with pytest.raises(ForethoughtError, match="steps_between must be ≥ 1, got 0"):
        Outer.from_settings(steps_between=0)  # the nested object checks itself


def test_a_run_folders_settings_bind_it_and_older_files_still_open(tmp_path):
    settings_file = tmp_path / "run" / "config.json"
    record_settings(settings_file, Outer.from_settings(lr=0.1, out="a"))
    record_settings(settings_file, Outer.from_settings(lr=0.1, steps_between=9, out="b"))  # free to change
    with pytest.raises(ForethoughtError, match=r"holds a run with other settings \(lr: 0.1 → 0.2\)"):
        record_settings(settings_file, Outer.from_settings(lr=0.2))
    assert json.loads(settings_file.read_text()) == {"seq_len": 8, "lr": 0.1, "preset": None}  # refused: unchanged
    settings_file.write_text(json.dumps({"seq_len": 8, "out": "old", "steps_between": 3}))  # before lr existed
    record_settings(settings_file, Outer.from_settings(lr=0.5))  # a missing setting counts as its default
    with pytest.raises(ForethoughtError, match=r"lr: 0.5 → 0.1"):
        settings_file.write_text(json.dumps({"seq_len": 8}))
        record_settings(settings_file, Outer.from_settings(lr=0.1))
