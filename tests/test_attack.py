"""scripts/attack.py, the audit of bad command lines and damaged files: it attacks every flag, damages a file
both ways, and tells a detected fault from one that had no effect and one used silently."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "attack.py"
spec = importlib.util.spec_from_file_location("attack", SCRIPT)
attack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(attack)


def test_every_flag_of_every_command_is_attacked():
    attacked = {(command, argv[0]) for command, argv in attack.cases()}
    flags = {(command, flag[0]) for command, described in attack.SPECS.items() for flag in described["flags"]}
    assert len(flags) > 250 and flags - attacked == set()  # analyses/cli.json: what the parser is built from
    assert set(attack.BASE) == set(attack.SPECS)  # a valid line for every command to attack on top of


def test_damages_change_the_file_both_ways(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(bytes(range(200)))
    damaged = attack.damages(file)
    assert damaged["cut to half"] == bytes(range(100))
    flipped = damaged["8 bytes flipped"]
    assert len(flipped) == 200 and sum(a != b for a, b in zip(flipped, bytes(range(200)))) == 8


def test_classes():
    error = "progress 10%\nforethought: error: x.npy was changed or damaged\n"
    assert attack.fault_class(2, error, "", "clean") == "detected"
    assert attack.fault_class(0, "", "clean", "clean") == "no effect"
    assert attack.fault_class(0, "", "other", "clean") == "used silently"
    assert attack.fault_class(1, "Traceback (most recent call last):\n", "", "clean") == "traceback"
    assert attack.classify(2, "forethought: error: steps must be ≥ 1\n", changed=False) == "one line"
    assert attack.classify(2, "a warning\nforethought: error: steps must be ≥ 1\n", changed=False) == "other"
    assert attack.classify(2, "forethought: error: no\n", changed=True) == "refused, but wrote"
    assert attack.classify(None, "", changed=True) == "ran on"
