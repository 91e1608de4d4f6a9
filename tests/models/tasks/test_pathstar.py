"""Path-star graphs: the paper's format byte for byte, valid generation, disjoint splits, regimes, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forethought.core.errors import ForethoughtError
from forethought.models.tasks.pathstar import (
    IGNORE,
    PathStarData,
    PathStarSpec,
    PathStarTask,
    format_line,
    generate,
    generate_split,
    parse_line,
    parse_text,
)

PAPER_LINE = "32,3|16,12|3,19|32,34|34,6|6,16|19,47|47,28/32,12=32,34,6,16,12"  # the G(2, 5) test file


def test_paper_line_round_trips_byte_exactly(tmp_path):
    data = PathStarData.from_lines([PAPER_LINE], n_nodes=50)
    assert str(data.spec) == "G(2, 5, 50)" and data.lines() == [PAPER_LINE]
    (tmp_path / "deg_2_path_5_nodes_50_test_20000.txt").write_text(PAPER_LINE + "\n" + PAPER_LINE + "\n")
    loaded = PathStarData.load(tmp_path / "deg_2_path_5_nodes_50_test_20000.txt", n_nodes=50)
    assert len(loaded) == 2 and loaded.lines() == [PAPER_LINE] * 2
    assert data.goal_arm().tolist() == [1]  # arm of 32→3 is written first, the goal arm (32→34) second


def test_numeral_tokens_follow_the_paper():
    data = PathStarData.from_lines([PAPER_LINE], n_nodes=50)
    prefix = data.prefix_tokens()[0].tolist()
    assert len(prefix) == 3 * 8 + 3
    assert prefix[:6] == [32, 3, 50, 16, 12, 50]  # | = N
    assert prefix[-4:] == [52, 32, 12, 51]  # / = N + 2, start, goal, = is N + 1
    inputs, labels = data.sequences("teacher-forcing")
    assert inputs.shape == labels.shape == (1, 27 + 4)
    assert inputs[0, 27:].tolist() == [32, 34, 6, 16] and labels[0, 26:].tolist() == [32, 34, 6, 16, 12]
    assert (labels[0, :26] == IGNORE).all()
    inputs, labels = data.sequences("teacherless")
    assert inputs[0, 27:].tolist() == [53] * 4 and labels[0, 26:].tolist() == [32, 34, 6, 16, 12]
    _, labels = data.sequences("reverse")
    assert labels[0, 26:].tolist() == [12, 16, 6, 34, 32]


def test_generated_graphs_are_valid_stars_and_round_trip():
    spec = PathStarSpec(3, 4, 30)
    data = generate(spec, 200, np.random.default_rng(0))
    lines = data.lines()
    for number, line in enumerate(lines, 1):
        parse_line(line, number)  # raises on anything that is not a path-star sample
    again = PathStarData.from_lines(lines, n_nodes=30)
    assert np.array_equal(again.edges, data.edges) and np.array_equal(again.path, data.path)
    assert len({tuple(row) for row in data.path[:, 1:2]}) > 1
    assert np.bincount(data.goal_arm(), minlength=3).min() > 40  # the goal arm is not always written first


def test_split_is_disjoint_and_seeded():
    spec = PathStarSpec(2, 2, 4)  # so few distinct graphs that collisions are certain
    train, test = generate_split(spec, 30, 4, seed=1)
    assert not set(train.keys().tolist()) & set(test.keys().tolist())
    assert len(set(test.keys().tolist())) == 4
    again, _ = generate_split(spec, 30, 4, seed=1)
    assert np.array_equal(again.edges, train.edges)
    with pytest.raises(ForethoughtError, match="too few distinct samples"):
        generate_split(spec, 30, 1000, seed=1)


def test_task_batches_and_loss_only_on_targets():
    train, _ = generate_split(PathStarSpec(2, 3, 10), 50, 5)
    task = PathStarTask(train, "teacher-forcing")
    inputs, labels = task.sample(8, torch.Generator().manual_seed(0))
    assert inputs.shape == (8, 3 * 4 + 3 + 2) and (labels != IGNORE).sum(1).tolist() == [3] * 8


def test_the_prefix_loss_variant_predicts_every_next_token_and_keeps_the_targets():
    train, _ = generate_split(PathStarSpec(2, 3, 10), 20, 5)
    inputs, plain = train.sequences("teacher-forcing")
    _, labels = train.sequences("teacher-forcing", prefix_loss=True)
    prefix = train.spec.prefix_len
    assert (labels != IGNORE).all()  # every position predicts something
    np.testing.assert_array_equal(labels[:, : prefix - 1], inputs[:, 1:prefix])  # the next prefix token
    np.testing.assert_array_equal(labels[:, prefix - 1 :], plain[:, prefix - 1 :])  # the targets as before
    task = PathStarTask(train, "teacherless", prefix_loss=True)
    assert "loss on the prefix too" in task.describe()
    assert (task.labels[:, : prefix - 1] == torch.from_numpy(inputs[:, 1:prefix])).all()  # teacherless inputs: $


@pytest.mark.parametrize(
    "line, message",
    [
        ("1,2|1,3|2,4|3,5/1,4=1,3,4", "the path is not in the graph"),
        ("1,2|1,3|2,4|3,4/1,4=1,2,4", "repeated labels"),
        ("1,2|2,3|3,4/1,4=1,2,3,4", "not a star"),
        ("1,2|1,3|2,4/1,4=1,2,4", "not a star"),
        ("1,2|1,3/1,2=1,3", "from the start 1 to the goal 2"),
        ("1;2|1,3/1,2=1,2", "not of the form"),
    ],
)
def test_malformed_lines_name_the_line(line, message):
    with pytest.raises(ForethoughtError, match=f"data.txt line 3: .*{message}"):
        PathStarData.from_lines([PAPER_LINE, PAPER_LINE, line], source="data.txt")


def test_mixed_sizes_and_bad_specs_are_refused():
    other = "1,2|1,3/1,2=1,2"
    with pytest.raises(ForethoughtError, match=r"line 2: G\(2, 2\) differs from line 1's G\(2, 5\)"):
        PathStarData.from_lines([PAPER_LINE, other])
    with pytest.raises(ForethoughtError, match="degree d must be at least 2"):
        PathStarSpec(1, 5, 50)
    with pytest.raises(ForethoughtError, match="path length l must be at least 2"):
        PathStarSpec(2, 1, 50)
    with pytest.raises(ForethoughtError, match=r"N = 8 labels are too few for G\(2, 5\): it has 9 nodes"):
        PathStarSpec(2, 5, 8)
    with pytest.raises(ForethoughtError, match="unknown regime 'teacher_forcing'"):
        PathStarTask(PathStarData.from_lines([PAPER_LINE]), "teacher_forcing")


@pytest.mark.parametrize("spec", [PathStarSpec(2, 5, 50), PathStarSpec(5, 5, 50), PathStarSpec(3, 2, 1200)])
def test_vectorised_text_is_the_line_by_line_text(spec):
    data = generate(spec, 500, np.random.default_rng(1))
    text = data.text()
    assert text == "".join(format_line(edges, path) + "\n" for edges, path in zip(data.edges, data.path))
    edges, path = parse_text(text)
    looped = PathStarData.from_lines(text.splitlines(), n_nodes=spec.n_nodes)
    assert np.array_equal(edges, looped.edges) and np.array_equal(path, looped.path)
    bulk = PathStarData.from_text(text, n_nodes=spec.n_nodes)
    assert (
        bulk.spec == looped.spec and np.array_equal(bulk.edges, looped.edges) and np.array_equal(bulk.path, looped.path)
    )
    assert parse_text(text.rstrip("\n")) is not None  # a last line without its newline


# PAPER_LINE with one defect each, keeping its layout (so only the bulk checks can catch it)
SAME_LAYOUT = {
    "32,3|16,12|3,19|32,34|34,6|6,16|19,47|47,28/32,12=32,34,6,19,12": "the path is not in the graph",
    "32,3|16,12|3,19|32,34|34,6|6,16|19,47|47,16/32,12=32,34,6,16,12": "repeated labels",
    "32,3|16,12|3,19|32,34|34,6|6,16|3,47|47,28/32,12=32,34,6,16,12": "not a star",
    "32,3|16,12|3,19|32,34|34,6|6,16|19,47|47,28/32,28=32,34,6,16,12": "not of the form|the goal 28",
    "32,3|16,12|3,19|32,34|34,6|6,16|19,47|47,28/32,12=34,34,6,16,12": "from the start 32",
    "32,3|16,12|3,19|32,34|34,6|6,16|19,47|47,28/32,12=32,34,6,16,x": "not of the form",
    "32,3|16,12|3,19|32,34|34,6|6,16|19,47|47,28/32,12=32,34,6,,12": "not of the form",
}


@pytest.mark.parametrize("line, message", SAME_LAYOUT.items())
def test_a_defect_the_bulk_parser_finds_is_named_by_line(line, message):
    text = "\n".join([PAPER_LINE, PAPER_LINE, line, PAPER_LINE]) + "\n"
    assert parse_text(text) is None
    with pytest.raises(ForethoughtError, match=f"data.txt line 3: .*({message})"):
        PathStarData.from_text(text, source="data.txt")
