"""The command line: bad input gives one line naming the problem, no traceback, nothing overwritten."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from forethought.analyses.cli import (
    COMMANDS,
    EXAMPLES,
    FIGURES,
    SPEC_FILE,
    _subcommands,
    build_parser,
    cli_reference,
    command_specs,
    main,
)

ROOT = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test printed before
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "nope"], "unknown preset 'nope'; choose one of paper, cpu"),
        (["--p", "1.5"], r"p must be in [0, 1], got 1.5"),
        (["--seq-len", "1"], "seq_len must be ≥ 2, got 1"),
    ],
)
def test_bad_settings_are_one_line_errors(capsys, tmp_path, argv, message):
    code, out, err = run_cli(capsys, "synthetic", *argv, "--out", str(tmp_path / "run"))
    assert code == 2
    assert err == f"forethought: error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_refused_and_kept(capsys, tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("precious")
    code, _, err = run_cli(capsys, "synthetic", "--out", str(target), "--steps", "1")
    assert code == 2 and err == f"forethought: error: --out {target} is a file, not a folder\n"
    assert target.read_text() == "precious"


def test_what_the_file_system_refuses_is_named(capsys, tmp_path, monkeypatch):
    """A refused write names the file, or the run folder where the error does not; a size limit is explained."""
    import errno

    from forethought.analyses import synthetic

    for error, expected in [
        (OSError(errno.EFBIG, "File too large"), "a file reached the largest size this process may write (the "
                                                  f"file-size limit, ulimit -f) (while writing under {tmp_path}/r)"),
        (FileExistsError(errno.EEXIST, "File exists", "afile.txt"), "afile.txt already exists where this command "
                                                                    "needs to make a folder or file: move it away"),
        (OSError(errno.EACCES, "Permission denied", "x/y"), "Permission denied: x/y"),
        (MemoryError("Unable to allocate 3.55 PiB"), "not enough memory for these settings (Unable to allocate 3.55 "
                                                     "PiB); choose smaller ones"),
    ]:
        def refuse(config, error=error):
            raise error
        monkeypatch.setattr(synthetic, "run_synthetic", refuse)
        code, _, err = run_cli(capsys, "synthetic", "--out", f"{tmp_path}/r")
        assert (code, err) == (2, f"forethought: error: {expected}\n")


def test_bad_checkpoints_are_named(capsys, tmp_path, tiny_lm):
    code, _, err = run_cli(capsys, "synthetic", "--vanilla-checkpoint", str(tmp_path / "missing"),
                           "--out", str(tmp_path / "run"))
    assert code == 2 and err.startswith("forethought: error: checkpoint folder") and "does not exist" in err
    tiny_lm.save_pretrained(tmp_path / "lm")
    code, _, err = run_cli(capsys, "synthetic", "--myopic-checkpoint", str(tmp_path / "lm"),
                           "--out", str(tmp_path / "run"))
    assert code == 2 and "holds a GPT2LMHeadModel, expected a GPT2RegressionModel" in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_flags_cover_every_setting():
    parser = build_parser()
    args = parser.parse_args(["synthetic", "--n-terms", "4", "--no-progress", "--figures-dir", "f"])
    assert (args.n_terms, args.progress, args.figures_dir) == (4, False, "f")
    assert not hasattr(args, "steps")  # unset flags leave the preset's value


@pytest.mark.parametrize("command", ["demo", "synthetic", "pathstar", "train"])
def test_every_command_that_trains_takes_the_training_settings_by_their_flat_names(command, monkeypatch):
    """One TrainSettings for all: --lr, --myopic-cut, --precision … reach each command's training settings (that
    the cut then reaches the twins' training: tests/analyses/test_synthetic.py)."""
    from dataclasses import replace

    from forethought.analyses import cli
    from forethought.core.settings import Presets
    from forethought.models.train import TrainSettings

    built = {}

    def keep(name, config, result) -> str:
        built["config"] = config
        return ""

    monkeypatch.setitem(cli.COMMANDS, command, replace(cli.COMMANDS[command], run="builtins:repr", report=keep))
    assert main([command, "--lr", "0.02", "--myopic-cut", "kv", "--precision", "float32", "--eval-every", "7"]) == 0
    training = built["config"].training
    assert type(training) is TrainSettings
    assert (training.lr, training.myopic_cut, training.precision, training.eval_every) == (0.02, "kv", "float32", 7)
    assert type(built["config"]).from_preset.__func__ is Presets.from_preset.__func__  # written once


@pytest.mark.parametrize("model, name", [("gpt2", "GPT2"), ("llama", "Llama"), ("gpt-neox", "GPTNeoX")])
def test_bench_train_prints_ratios(capsys, model, name):
    code, out, _ = run_cli(
        capsys, "bench", "myopic", "--model", model, "--n-layer", "1", "--d-model", "16", "--n-head", "2",
        "--vocab-size", "11", "--seq-len", "16", "--batch-size", "2", "--steps", "1", "--rounds", "3", "--warmup", "1",
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"forethought bench train — cpu, {name} 1 layers × d_model 16, vocab 11")
    assert lines[1].split() == ["variant", "ms_per_step", "ratio_to_vanilla", "round_ratio_min", "round_ratio_max",
                                "tokens_per_s"]
    rows = [line.rsplit(maxsplit=5) for line in lines[2:]]
    assert [row[0].strip() for row in rows] == ["vanilla", "myopic (fast)", "myopic (naive)"]
    assert rows[0][2:5] == ["1.000"] * 3
    for _, _, ratio, low, high, _ in rows:  # the ratio of medians lies within the rounds' ratios
        assert float(low) <= float(ratio) <= float(high)


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "forethought", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "synthetic" in result.stdout and "bench" in result.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--degree", "1"], "degree must be ≥ 2, got 1"),
        (["--length", "1"], "length must be ≥ 2, got 1"),
        (["--n-nodes", "6"], "N = 6 labels are too few for G(2, 4): it has 7 nodes"),
        (["--regimes", "teacher-forcing,revers"],
         "unknown regime 'revers'; choose one of teacher-forcing, teacherless, reverse"),
    ],
)
def test_pathstar_bad_settings_are_one_line_errors(capsys, tmp_path, argv, message):
    code, _, err = run_cli(capsys, "pathstar", *argv, "--out", str(tmp_path / "run"))
    assert code == 2 and err == f"forethought: error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_pathstar_mixed_file_names_the_line(capsys, tmp_path):
    (tmp_path / "train.txt").write_text("1,2|1,3/1,2=1,2\n1,2|1,3|2,4|3,5/1,4=1,2,4\n")
    (tmp_path / "test.txt").write_text("1,2|1,3/1,2=1,2\n")
    code, _, err = run_cli(capsys, "pathstar", "--train-file", str(tmp_path / "train.txt"),
                           "--test-file", str(tmp_path / "test.txt"), "--out", str(tmp_path / "run"))
    assert code == 2 and "train.txt line 2: G(2, 3) differs from line 1's G(2, 2)" in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_pathstar_data_writes_the_paper_files(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "pathstar-data", "--degree", "2", "--length", "3", "--n-nodes", "9",
                           "--n-train", "50", "--n-test", "10", "--out", str(tmp_path))
    assert code == 0 and "generated 60 samples of G(2, 3, 9)" in out
    lines = (tmp_path / "deg_2_path_3_nodes_9_train_50.txt").read_text().splitlines()
    assert len(lines) == 50 and (tmp_path / "deg_2_path_3_nodes_9_test_10.txt").exists()


def test_checkpoint_of_another_architecture_is_named(capsys, tmp_path):
    from forethought.models.gpt2 import build_regression, regression_config
    config = regression_config(in_dim=2, out_dim=1, n_layer=3, d_model=16, n_head=2, n_positions=32)
    build_regression(config).save_pretrained(tmp_path / "deep")
    code, _, err = run_cli(capsys, "synthetic", "--vanilla-checkpoint", str(tmp_path / "deep"),
                           "--out", str(tmp_path / "run"))
    assert code == 2 and "has n_layer=3, but the settings say 2" in err
    assert not (tmp_path / "run").exists()


def test_bench_probe_prints_throughput_and_the_sklearn_ratio(capsys, tmp_path):
    code, out, _ = run_cli(
        capsys, "bench", "probe", "--n-layer", "1", "--d-model", "64", "--n-sequences", "24", "--taus", "1,2",
        "--classes", "5", "--epochs", "2", "--sklearn-max-iter", "20", "--folder", str(tmp_path / "bench"),
    )
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("forethought bench probe — cpu, GPT-2 1 layers"))
    assert "of 4 probes" in lines[header]  # 2 layers × 2 τ
    rows = lines[header + 2 :]
    assert [" ".join(row.split()[:2]) for row in rows] == ["cache (forward", "cache digests", "probes: torch,",
                                                           "probes: sklearn,"]
    assert float(rows[2].split()[-1]) > 0 and float(rows[3].split()[-1]) == 1.0
    assert list((tmp_path / "bench").iterdir()) == []  # the model and cache were temporary


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["demo", "--help"], 0), (["bench", "cache", "--help"], 0),
                                         (["probe", "--no-such-flag"], 2), (["demo", "--steps", "many"], 2)])
def test_help_and_bad_flags_are_answered_before_torch_or_any_experiment_loads(argv, code):
    script = ("import sys; from forethought.analyses.cli import main\n"
              f"try:\n    code = main({argv!r})\nexcept SystemExit as exit:\n    code = exit.code\n"
              "heavy = sorted(m for m in ('torch', 'transformers', 'plotly', 'pandas', 'transformer_lens', "
              "'forethought.analyses.synthetic', 'forethought.models.lm') if m in sys.modules)\n"
              "print('exit', code, 'loaded', heavy, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.stderr.splitlines()[-1] == f"exit {code} loaded []", result.stderr
    if code == 2:
        assert result.stderr.splitlines()[0].startswith("forethought: error: ")


def test_the_cli_reference_in_docs_is_the_parsers_help():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _, current, _ = script.split_page((ROOT / "docs" / "cli.md").read_text())
    assert script.spec_json(command_specs()) == SPEC_FILE.read_text(), "cli.json is stale: run that script"
    reference = cli_reference()
    assert current == f"\n{reference}\n", "docs/cli.md is stale: run python scripts/cli_reference.py"
    assert "<code>forethought bench probe</code>" in reference and "--checkpoints NAME=SOURCE,…" in reference
    assert "readme" not in build_parser().format_help()  # a maintainer's tool, not a user command


PYTHON_IN_HELP = re.compile(r"``|\bNone\b|\bTrue\b|\bFalse\b|[A-Z]{2,}_[A-Z_]+|\(default: \)|:(class|func|data):|\{")


def test_every_flag_is_described_in_words_with_its_default_once():
    for command, spec in json.loads(SPEC_FILE.read_text()).items():
        assert not PYTHON_IN_HELP.search(spec["description"]), command
        for flag, _, _, text in spec["flags"]:
            described = re.sub(r"\s*\([^()]*\)$", "", text)  # without the default (or each preset's value)
            assert described and not PYTHON_IN_HELP.search(text) and text.count("default") <= 1, (command, flag, text)
    reference = cli_reference()  # switches and empty defaults in words
    assert "show progress bars (default: on)" in reference and "(default: none)" in reference


def test_every_command_has_two_examples_that_parse_and_show_in_its_help():
    parser = build_parser()
    assert set(EXAMPLES) == set(COMMANDS)
    for name, examples in EXAMPLES.items():
        assert len(examples) >= 2, name
        for line, what in examples:
            words = shlex.split(line)
            assert words[:1 + len(name.split())] == ["forethought", *name.split()] and what, line
            parser.parse_args(words[1:])  # every flag exists and every value parses
        subparser = dict(_subcommands(parser))[name]
        assert subparser.format_help().rstrip().endswith(f"  {examples[-1][0]}\n      {examples[-1][1]}")


def test_the_command_summary_is_the_same_in_the_readme_and_docs_and_names_every_command():
    def summary(page: str) -> list[str]:
        return [line for line in (ROOT / page).read_text().splitlines() if re.match(r"forethought [a-z]", line)]
    readme = summary("README.md")
    assert readme == summary("docs/cli.md")[:len(readme)]
    named = " ".join(readme)
    for name in COMMANDS:
        group, _, member = name.partition(" ")
        assert re.search(rf"forethought {group}\b", named) or f"|{group}" in named, name
        assert not member or member in named, name


def test_figures_lists_commands_that_parse(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "figures", "--dry-run", "--log", str(tmp_path / "none.json"))
    assert code == 0 and out.splitlines() == [f"forethought {line}" for line in FIGURES]
    made = set()
    for line in FIGURES:
        args = vars(build_parser().parse_args(line.split()))
        read = [] if args["command"] == "train" else [args.get(key) for key in ("vanilla", "myopic", "run")]
        for folder in filter(None, read + list(args.get("runs", ()))):  # a named model (smollm2-135m) is given
            assert folder in made or not folder.startswith("runs/"), f"{line}: {folder} is made by no earlier command"
        figures_dir = args.get("figures_dir") or "figures"
        assert figures_dir.split("/")[0] == "figures"  # every figure lands in figures/ (or a folder of it)
        made.add(args.get("out"))  # results a later command may read


def test_figures_resumes_after_the_commands_it_finished_and_records_their_wall_times(tmp_path, monkeypatch, capsys):
    from forethought.analyses import cli
    from forethought.core.errors import ForethoughtError

    lines = [f"probe --out {tmp_path / 'a'}", f"gap --out {tmp_path / 'b'}", "seeds --runs x,y"]
    ran: list[str] = []

    def fake_main(argv: list[str]) -> int:  # each "command" makes its --out folder, or fails on "fail"
        ran.append(" ".join(argv))
        if "--out" in argv:
            Path(argv[argv.index("--out") + 1]).mkdir()
        return 1 if "fail" in argv else 0

    monkeypatch.setattr(cli, "FIGURES", lines)
    monkeypatch.setattr(cli, "main", fake_main)
    log = tmp_path / "figures.json"
    cli.run_figures(cli.FiguresConfig(log=str(log)))
    assert ran == lines and set(json.loads(log.read_text())) == set(lines)
    assert all(done["wall_s"] >= 0 for done in json.loads(log.read_text()).values())
    assert capsys.readouterr().out.count("  # wall ") == 3
    ran.clear()
    cli.run_figures(cli.FiguresConfig(log=str(log)))  # all finished: nothing runs again
    assert ran == [] and capsys.readouterr().out.count("# done earlier, wall ") == 3
    (tmp_path / "b").rmdir()  # a finished command whose results are gone runs again, alone
    cli.run_figures(cli.FiguresConfig(log=str(log)))
    assert ran == [lines[1]]
    ran.clear()
    cli.run_figures(cli.FiguresConfig(log=str(log), dry_run=True))
    assert ran == []
    monkeypatch.setattr(cli, "FIGURES", [*lines, f"train --out {tmp_path / 'c'} fail"])
    with pytest.raises(ForethoughtError, match="stopped: `forethought train .* failed"):
        cli.run_figures(cli.FiguresConfig(log=str(log)))
    assert ran == [f"train --out {tmp_path / 'c'} fail"] and len(json.loads(log.read_text())) == 3  # kept
    ran.clear()
    monkeypatch.setattr(cli, "FIGURES", lines)
    for folder in "abc":  # --redo runs every command, finished or not
        (tmp_path / folder).rmdir()
    cli.run_figures(cli.FiguresConfig(log=str(log), redo=True))
    assert ran == lines
    log.write_text(json.dumps({lines[0]: {"wall": 3}}))
    with pytest.raises(ForethoughtError, match="figures.json is damaged"):
        cli.run_figures(cli.FiguresConfig(log=str(log)))
    for bad in (tmp_path, log / "x.json"):  # refused before any command runs
        with pytest.raises(ForethoughtError, match="cannot be written"):
            cli.run_figures(cli.FiguresConfig(log=str(bad)))
    assert ran == lines


def test_bench_cache_prints_the_ratio_to_a_bare_forward_pass(capsys, llama_folder, llama_text, tmp_path):
    code, out, err = run_cli(
        capsys, "bench", "cache", "--model", str(llama_folder), "--corpus", str(llama_text), "--n-sequences", "8",
        "--seq-len", "8", "--batch-size", "4", "--rounds", "1", "--precision", "float32",
        "--tokens-root", str(tmp_path / "tokens"), "--folder", str(tmp_path / "bench"))
    assert code == 0 and "caching needs about" in err  # the library's log line, shown by the command line
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("forethought bench cache — cpu, "))
    assert "LlamaForCausalLM, 2 layers" in lines[header]
    rows = {line.rsplit(maxsplit=2)[0].strip(): [float(v) for v in line.split()[-2:]] for line in lines[header + 2:]}
    caching = "caching (forward hooks, float16 writes, digest)"
    assert set(rows) == {"Hugging Face forward (output_hidden_states)", "forward hooks (residuals, no writes)",
                         "TransformerLens bridge (residuals, no writes)", caching}
    assert rows["Hugging Face forward (output_hidden_states)"][1] == 1.0 and rows[caching][0] > 0
    assert list((tmp_path / "bench").iterdir()) == []  # the caches were temporary


def test_bench_grid_times_every_step_against_a_bare_forward_pass(capsys, llama_folder, llama_text, tmp_path):
    code, out, err = run_cli(
        capsys, "bench", "grid", "--model", str(llama_folder), "--corpus", str(llama_text), "--max-sequences", "20",
        "--seq-len", "8", "--taus", "1,2", "--top-k", "10", "--max-epochs", "1", "--precision", "float32",
        "--tokens-root", str(tmp_path / "tokens"), "--folder", str(tmp_path / "bench"))
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("forethought bench grid — cpu, "))
    run = re.search(r"20 sequences × 8 tokens \(test: (\d+) from (\d+) documents\), 3 layers × τ 1,2, topk K = 10",
                    lines[header])
    assert run and int(run[1]) >= int(run[2]) >= 1  # the probes' test split: whole documents (clusters)
    assert lines[header].endswith("(the grid runs model and random init: one pass each)")
    rows = {line.rsplit(maxsplit=2)[0].strip(): [float(v) for v in line.split()[-2:]] for line in lines[header + 2:]}
    steps = [f"{step} {name}" for name in ("model", "random init") for step in ("caching", "topk", "logit lens")]
    assert set(rows) == {*steps, "the whole grid (the steps above, count baselines, tables)"}
    whole = rows.pop("the whole grid (the steps above, count baselines, tables)")
    assert whole[0] >= sum(seconds for seconds, _ in rows.values()) - 0.5  # rounded to 0.1 s each
    for seconds, ratio in [whole, *rows.values()]:  # each step ÷ the same forward pass
        assert ratio == pytest.approx(seconds / whole[0] * whole[1], rel=0.02, abs=0.05)
    assert list((tmp_path / "bench").iterdir()) == []  # the run folder was temporary


def test_bench_paths_times_the_edited_runs_both_ways(capsys, llama_folder, llama_text, tmp_path):
    code, out, err = run_cli(
        capsys, "bench", "paths", "--model", str(llama_folder), "--corpus", str(llama_text), "--layers", "0,1,2",
        "--tau", "2", "--positions", "3", "--n-sequences", "4", "--seq-len", "12", "--batch-size", "2", "--rounds",
        "1", "--tokens-root", str(tmp_path / "tokens"))
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("forethought bench paths — cpu, "))
    assert "LlamaForCausalLM, 2 layers), float32, 4 sequences × 12 tokens, positions [0, 4, 8]" in lines[header]
    assert lines[header + 1].split() == ["layer", "cached_replayed_ms", "whole_prefixes_ms", "speedup"]
    rows = [[float(v) for v in line.split()] for line in lines[header + 2:]]
    assert [row[0] for row in rows] == [0, 1, 2]
    for _, cached, whole, speedup in rows:
        assert cached > 0 and whole > 0 and speedup == pytest.approx(whole / cached, rel=0.01, abs=0.002)
    code, out, err = run_cli(capsys, "bench", "paths", "--model", str(llama_folder), "--layers", "0,3",
                             "--tokens-root", str(tmp_path / "other"))
    assert code == 2 and err.strip().endswith(f"layers reach 3, but {llama_folder} has residual layers 0 … 2")
    assert not (tmp_path / "other").exists()


def test_bench_side_by_side_times_two_runs_both_ways(capsys):
    code, out, err = run_cli(capsys, "bench", "side-by-side", "--command-line", "bench pathstar --n-train 200")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("forethought bench side-by-side — two runs of `forethought bench pathstar")
    rows = {" ".join(line.split()[:-2]): [float(v) for v in line.split()[-2:]] for line in lines[2:]}
    assert set(rows) == {"one after the other", "started together"} and rows["one after the other"][1] == 1.0
    assert rows["started together"][0] > 0
    for command, message in [("bench side-by-side", "cannot time itself"), ("probe --x", "not a forethought command")]:
        code, _, err = run_cli(capsys, "bench", "side-by-side", "--command-line", command)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
