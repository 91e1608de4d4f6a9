"""Result tables a later command trusts: their digests are checked on every read and rates kept in range — the
second attack XOR-ed one byte of results.parquet and `seeds` reported a top-1 of 1.36."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from forethought.analyses.cli import main
from forethought.analyses.results import read_by_text, read_results, tidy, write_results
from forethought.core.errors import ForethoughtError


def _run(folder, top1: float = 0.085) -> None:
    rows = [{"checkpoint": "vanilla", "layer": layer, "tau": 1, "metric": "top1", "value": top1, "ci_low": top1 - 0.01,
             "ci_high": top1 + 0.01, "n": 100} for layer in range(3)]
    table = tidy(rows, task="text", split="test", seed=0)
    write_results(table, folder, {"config": {"vanilla": "v"}}, by_text=table.assign(target="kjv"))


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_table_is_named_never_read(tmp_path, capsys):
    for name in ("a", "b"):
        _run(tmp_path / name)
    table, meta = read_results(tmp_path / "a")
    assert set(meta["digests"]) == {"results.parquet", "by_text.parquet"} and len(read_by_text(tmp_path / "a")) == 3
    _flip(tmp_path / "a" / "results.parquet", 200)
    with pytest.raises(ForethoughtError, match=r"results.parquet was changed or damaged .*; run its command again"):
        read_results(tmp_path / "a")
    assert main(["seeds", "--runs", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--out", str(tmp_path / "s")]) == 2
    assert "results.parquet was changed or damaged" in capsys.readouterr().err and not (tmp_path / "s").exists()
    _flip(tmp_path / "b" / "by_text.parquet", 200)
    with pytest.raises(ForethoughtError, match=r"by_text.parquet was changed or damaged"):
        read_by_text(tmp_path / "b")


def test_a_rate_out_of_range_is_refused_and_runs_from_before_digests_still_read(tmp_path):
    _run(tmp_path / "wrong", top1=1.36)  # written consistently, digest and all: the range still catches it
    with pytest.raises(ForethoughtError, match=r"holds a top-1 / top-5 value outside \[−1, 1\]: damaged"):
        read_results(tmp_path / "wrong")
    _run(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "meta.json").read_text())
    del meta["digests"]
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    table, _ = read_results(tmp_path / "old")
    assert isinstance(table, pd.DataFrame) and len(table) == 3
