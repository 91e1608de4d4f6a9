"""Bad input, command by command: one line naming the problem, exit code 2, and nothing written.

The table grows with every command and every setting: each row is the command line and a pattern its one-line
error must match. The files a row names are made by the ``workdir`` fixture (a corpus that is not UTF-8, a
parquet file that is not one, a checkpoint with truncated weights, a run folder of another command …).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

from forethought.analyses.cli import main

# a loadable tiny LM on a corpus of its words, token files kept outside the working folder: settings that only
# the checkpoint and the data can refute
GOOD = ["--checkpoints", "good", "--corpus", "words.txt", "--seq-len", "8", "--tokens-root", "../tokens"]

BAD_INPUT = {
    "demo": [
        (["--steps", "-5"], r"steps must be ≥ 1, got -5"),
        (["--lr", "inf"], r"lr must be a finite number, got inf"),
        (["--lr", "nan"], r"lr must be a finite number, got nan"),
        (["--lr", "0"], r"lr must be > 0, got 0.0"),
        (["--batch-size", "0"], r"batch_size must be ≥ 1, got 0"),
        (["--weight-decay", "-0.1"], r"weight_decay must be ≥ 0"),
        (["--warmup-frac", "1"], r"warmup_frac must be in \[0, 1\), got 1.0"),
        (["--grad-clip", "-1"], r"grad_clip must be ≥ 0"),
        (["--eval-every", "0"], r"eval_every must be ≥ 1"),
        (["--checkpoint-every", "-2"], r"checkpoint_every must be ≥ 1"),
        (["--seed", "-1"], r"seed must be ≥ 0"),
        (["--d-model", "30", "--n-head", "4"], r"n_head 4 does not divide d_model 30"),
        (["--n-layer", "0"], r"n_layer must be ≥ 1"),
        (["--device", "cuda:7"], r"device 'cuda:7' is not there"),
        (["--device", "tpu"], r"unknown device 'tpu'"),
        (["--test-fraction", "1.5"], r"test_fraction must be in \(0, 1\)"),
        (["--heldout-sequences", "0"], r"heldout_sequences must be ≥ 1"),
        (["--p", "2"], r"p must be in \[0, 1\], got 2.0"),
        (["--freq", "-1"], r"freq must be > 0"),
        (["--ridge-alpha", "-1"], r"ridge_alpha must be ≥ 0"),
        (["--vanilla-checkpoint", "missing"], r"checkpoint folder missing does not exist"),
        (["--figures-dir", "corpus.txt"], r"--figures-dir corpus.txt is a file, not a folder"),  # trained first
        # the third attack: integers past 2³¹ (overflow tracebacks, or runs that never end)
        (["--steps", "99999999999999999999"], r"steps must be < 2³¹, got 99999999999999999999"),
        (["--heldout-sequences", "99999999999999999999"], r"heldout_sequences must be < 2³¹"),
    ],
    "pathstar": [
        (["--preset", "nope"], r"unknown preset 'nope'"),
        (["--epochs", "-1"], r"epochs must be > 0, got -1.0"),
        (["--regimes", "foo"], r"unknown regime 'foo'"),
        (["--regimes", "teacherless,teacherless"], r"regimes lists 'teacherless' twice"),
        (["--preset", ""], r"unknown preset ''; choose one of paper, cpu"),
        (["--trainings", "lazy"], r"lazy"),
        (["--degree", "1"], r"degree must be ≥ 2"),
        (["--n-nodes", "1"], r"n_nodes must be ≥ 2"),
        (["--eval-samples", "0"], r"eval_samples must be ≥ 1"),
        (["--probe-test-fraction", "0"], r"probe_test_fraction must be in \(0, 1\)"),
        (["--n-train", "99999999999999999999"], r"n_train must be < 2³¹"),
        (["--train-file", "missing.txt", "--test-file", "star.txt"], r"missing.txt does not exist"),
        (["--train-file", "latin1.txt", "--test-file", "star.txt"], r"latin1.txt is not a path-star text file"),
        (["--train-file", "star.txt", "--test-file", "notstar.txt"], r"notstar.txt line 1"),
        (["--train-file", "star.txt", "--test-file", "./star.txt"], r"--train-file and --test-file are the same file"),
        (["--out", "trainrun"], r"--out trainrun holds a run of another command \(its train_config.json\)"),
    ],
    "pathstar-data": [
        (["--n-train", "0"], r"n_train must be ≥ 1, got 0"),
        (["--seed", "-3"], r"seed must be ≥ 0 and < 2³², got -3"),
        (["--degree", "1"], r"degree"),
        (["--out", "corpus.txt"], r"--out corpus.txt is a file, not a folder"),
    ],
    "train": [
        (["--steps", "0"], r"steps must be ≥ 1, got 0"),
        (["--epochs", "-1"], r"epochs must be > 0"),
        (["--grad-clip", "-1"], r"grad_clip must be ≥ 0"),
        (["--dropout", "1.5"], r"dropout must be in \[0, 1\)"),
        (["--max-documents", "0"], r"max_documents must be ≥ 1"),
        (["--seq-len", "1"], r"seq_len must be ≥ 2"),
        (["--eval-batches", "0"], r"eval_batches must be ≥ 1"),
        (["--precision", "float16"], r"unknown precision 'float16'; choose one of auto, float32, bfloat16"),
        (["--device", "cuda:3"], r"device 'cuda:3' is not there"),
        (["--preset", "nope"], r"unknown preset 'nope'"),
        (["--tokenizer", "bpe:10"], r"the BPE size must be an integer from 257"),
        (["--myopic-cut", "x"], r"unknown myopic cut 'x'"),
        (["--corpus", "latin1.jsonl"], r"latin1.jsonl is not UTF-8 text"),
        (["--corpus", "broken.parquet"], r"broken.parquet is not a readable parquet file"),
        (["--corpus", "numbers.jsonl", "--model", "gpt2-micro"], r"document 2 is int, not text"),
        (["--corpus", "nothere"], r"corpus nothere is neither"),
        (["--model", "truncated", "--from-pretrained"], r"weights in truncated cannot be loaded"),
        (["--model", "gpt2-micro", "--from-pretrained"], r"--from-pretrained needs a folder or hub id"),
        # the second attack (issue 29): accepted before, or a traceback
        (["--out", ""], r"out is empty: give a value or leave the setting out"),
        (["--corpus", ""], r"corpus is empty"),
        (["--preset", ""], r"unknown preset ''; choose one of cpu"),
        (["--tokenizer", "bpe:"], r"--tokenizer bpe:: the BPE size must be an integer from 257"),
        (["--seed", "99999999999999999999"], r"seed must be ≥ 0 and < 2³², got 99999999999999999999"),
        (["--objective", "mtp:0"], r"objective must be next-token or mtp:K with K in 1 … 16, got 'mtp:0'"),
        (["--objective", "mtp:2", "--myopic"], r"objective mtp:2 trains positions for later tokens"),
        (["--model", "gpt2-mirco"], r"gpt2-mirco is neither a preset nor a folder; did you mean gpt2-micro\?"),
        (["--model", "./nothere"], r"model folder ./nothere does not exist$"),
        (["--corpus", "hf:"], r"corpus hf: names no dataset: give hf:NAME or hf:NAME:CONFIG"),
        (["--model", "blockless"], r"the config of blockless has -3 layers; a model needs at least one"),
        (["--model", "listconfig"], r"listconfig/config.json is damaged \(it holds a JSON list, not an object\)"),
        (["--out", "otherrun"], r"--out otherrun holds a run of another command \(its config.json\)"),
        (["--text-field", ""], r"text_field is empty"),
        (["--corpus", "corpus.txt", "--text-field", "body"], r"--text-field applies to jsonl, parquet and hub corpora, "
                                                             r"not to corpus.txt"),
        (["--corpus-split", "validation"], r"--corpus-split applies to hub datasets \(hf:NAME\), not to embedded"),
        (["--max-documents", "99999999999999999999"], r"max_documents must be < 2³¹"),
        (["--tokenizer", "nowhere"], r"nowhere is not a folder, and the Hugging Face hub cannot be reached to fetch "
                                     r"its tokenizer"),
        (["--tokenizer", "./nowhere"], r"tokenizer folder ./nowhere does not exist$"),
    ],
    "probe": [
        ([], r"give --checkpoints"),
        (["--checkpoints", "=truncated"], r"checkpoint name '' cannot name a folder"),
        (["--checkpoints", "a=truncated,a=truncated"], r"two checkpoints are named 'a'"),
        (["--checkpoints", "truncated"], r"weights in truncated cannot be loaded"),
        (["--checkpoints", "x", "--top-k", "0"], r"top_k must be ≥ 1, got 0"),
        (["--checkpoints", "x", "--taus", "0"], r"taus must be offsets ≥ 1"),
        (["--checkpoints", "x", "--taus", "a"], r"probe: argument --taus: taus must be comma-separated integers"),
        (["--checkpoints", "x", "--top-k", "abc"], r"probe: argument --top-k: invalid int value: 'abc'"),
        (["--checkpoints", "x", "--layers", "0", "--taus", "1", "--kind"], r"argument --kind: expected one argument"),
        (["--checkpoints", "x", "--max-epochs", "0"], r"max_epochs must be ≥ 1"),
        (["--checkpoints", "x", "--max-epochs", "99999999999999999999"], r"max_epochs must be < 2³¹"),
        (["--checkpoints", "x", "--patience", "-1"], r"patience must be ≥ 0"),
        (["--checkpoints", "x", "--max-sequences", "0"], r"max_sequences must be ≥ 1"),
        (["--checkpoints", "x", "--precision", "float8"], r"float8"),
        (["--checkpoints", "x", "--kind", "nope"], r"unknown probe kind 'nope'"),
        (["--checkpoints", "x", "--lr", "-1"], r"lr must be > 0"),
        (["--checkpoints", "x", "--taus", "1,1"], r"taus lists 1 twice"),
        (["--checkpoints", "x", "--taus", "1,,2"], r"taus has an empty item in '1,,2': lists take single commas"),
        (["--checkpoints", "x", "--layers", "0,0"], r"layers lists 0 twice"),
        (["--checkpoints", "x", "--taus", "1", "2"], r"unrecognized arguments: 2 \(lists take commas, not spaces"),
        (["--checkpoints", "smollm2-135"], r"smollm2-135 is not a folder; did you mean smollm2-135m\?"),
        (["--checkpoints", "./nothere"], r"checkpoint folder ./nothere does not exist$"),
        ([*GOOD, "--layers", "9"], r"layers \[9\] out of range: the checkpoints have residual layers 0 … 3"),
        ([*GOOD, "--taus", "8"], r"taus reach 8, but the held-out sequences have 8 tokens"),
        # damaged or hostile checkpoint files: one line naming the file, nothing run
        (["--checkpoints", "listconfig"], r"listconfig/config.json is damaged \(it holds a JSON list, not an object\)"),
        (["--checkpoints", "typedconfig"], r"typedconfig/config.json is damaged: architectures holds 5"),
        (["--checkpoints", "blockless"], r"the config of blockless has -3 layers"),
        (["--checkpoints", "torntokenizer"], r"cannot load a tokenizer from torntokenizer/tokenizer.json"),
        (["--checkpoints", "deeptokenizer"], r"cannot load a tokenizer from deeptokenizer/tokenizer.json .*recursion"),
        (["--checkpoints", "pickled"], r"the weights in pickled hold Python objects besides tensors: refused"),
        (["--checkpoints", "listdescription"], r"listdescription/forethought.json is damaged \(it holds a JSON list"),
        (["--checkpoints", "typeddescription"], r"typeddescription/forethought.json is damaged: data holds 5, a int"),
        ([*GOOD, "--kind", "topk", "--top-k", "100"], r"top_k 100 reaches the vocabulary's 23 tokens"),
        ([*GOOD, "--max-sequences", "1"], r"1 held-out documents \(clusters of sequences\) are too few"),
        ([*GOOD, "--out", "trainrun"], r"--out trainrun holds a run of another command \(its train_config.json\)"),
        ([*GOOD, "--out", "otherrun"], r"--out otherrun holds a run of another command or an older workbench "
                                       r"\(settings steps are not this command's\)"),
    ],
    "precache": [
        (["--vanilla", "truncated"], r"myopic"),
        (["--vanilla", "a", "--myopic", "b", "--max-epochs", "0"], r"max_epochs must be ≥ 1"),
        (["--vanilla", "good", "--myopic", "good", *GOOD[2:], "--layers", "-1"],  # before the loss match's warning
         r"layers \[-1\] out of range: the checkpoints have residual layers 0 … 3"),
    ],
    "gap": [
        ([], r"give --vanilla and/or --myopic"),
        (["--vanilla", "x", "--max-sequences", "0"], r"max_sequences must be ≥ 1"),
        (["--vanilla", "x", "--share-sequences", "-1"], r"share_sequences must be ≥ 1"),
        (["--vanilla", "nothere"], r"nothere is not a folder"),
        (["--vanilla", "truncated"], r"weights in truncated cannot be loaded"),
    ],
    "seeds": [
        (["--runs", ""], r"runs"),
        (["--runs", "nothere,nothere2"], r"nothere"),
        (["--runs", "otherrun,torn"], r"otherrun|torn"),
        (["--runs", "otherrun,otherrun"], r"runs lists 'otherrun' twice"),
    ],
    "trend": [
        (["--runs", "nothere"], r"give at least two run folders"),
        (["--runs", "nothere,nothere2"], r"nothere"),
    ],
    "compare": [
        (["--run", "otherrun"], r"otherrun holds no probe or precache run"),
        (["--run", "torn"], r"torn/config.json is damaged"),
        (["--run", "nothere"], r"nothere holds no probe or precache run"),
    ],
    "figures": [
        (["--log", "otherrun"], r"log otherrun cannot be written \(a folder"),
        (["--log", "corpus.txt/figures.json"], r"cannot be written \(a folder, or in a file's place\)"),
        (["--log", "torn/config.json"], r"torn/config.json is damaged"),
        (["--log", ""], r"log is empty"),
    ],
    "bench train": [
        (["--rounds", "0"], r"rounds must be ≥ 1"),
        (["--seq-len", "1"], r"seq_len must be ≥ 2"),
        (["--device", "cuda:2"], r"device 'cuda:2' is not there"),
        (["--model", "nowhere"], r"nowhere is not a folder, and the Hugging Face hub cannot be reached"),
    ],
    "bench probe": [
        (["--classes", "1"], r"classes must be ≥ 2"),
        (["--epochs", "0"], r"epochs must be > 0"),
        (["--taus", "0"], r"taus must be offsets ≥ 1, got 0"),  # both ran 26 s of caching first
        (["--taus", "64"], r"taus reach 64, but the benchmark's sequences have 64 tokens"),
        (["--folder", ""], r"folder is empty"),
        (["--d-model", "99999999999999999999"], r"d_model must be < 2³¹"),
    ],
    "bench pathstar": [
        (["--degree", "1"], r"degree must be ≥ 2"),
        (["--n-nodes", "5"], r"N = 5 labels are too few"),
        (["--n-train", "0"], r"n_train must be ≥ 1"),
        (["--n-train", "2000000000"], r"not enough memory for these settings \(.*\); choose smaller ones"),
        (["--n-train", "10000000000000"], r"n_train must be < 2³¹"),
    ],
    "bench grid": [
        (["--kind", "x"], r"unknown probe kind 'x'"),
        (["--taus", "0"], r"taus must be offsets ≥ 1"),
    ],
    "bench paths": [
        (["--tau", "0"], r"tau must be ≥ 1"),
        (["--tau", "63"], r"tau 63 needs sequences of at least 65 tokens; seq_len is 64"),
        (["--layers", "-1"], r"layers must be residual layers ≥ 0, got -1"),
    ],
    "bench cache": [
        (["--precision", "x"], r"precision"),
        (["--n-sequences", "0"], r"n_sequences must be ≥ 1"),
    ],
}
CASES = [(command, argv, pattern) for command, rows in BAD_INPUT.items() for argv, pattern in rows]


@pytest.fixture
def workdir(tmp_path_factory, monkeypatch, tiny_lm, lm_folder):
    """A working folder holding every bad file the table names."""
    tmp_path = tmp_path_factory.mktemp("work")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("a corpus, not a folder\n")
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    (tmp_path / "numbers.jsonl").write_text('{"text": "fine words here"}\n{"text": 12}\n')
    (tmp_path / "broken.parquet").write_text("not parquet")
    (tmp_path / "latin1.txt").write_bytes("1,2|1,3/1,3=1,3\xe9\n".encode("latin-1"))
    (tmp_path / "star.txt").write_text("0,1|1,2|0,3|3,4/0,4=0,3,4\n")
    (tmp_path / "notstar.txt").write_text("0,1|1,2/0,9=0,9\n")
    lm_folder.rename(tmp_path / "good")  # a tiny LM with its tokenizer (words w0 … w22)
    (tmp_path / "words.txt").write_text(
        "\n\n".join(" ".join(f"w{(i + j) % 23}" for j in range(12)) for i in range(200))
    )
    tiny_lm.float().save_pretrained(tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (tmp_path / "otherrun").mkdir()
    (tmp_path / "otherrun" / "config.json").write_text(json.dumps({"steps": 3}))
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "config.json").write_text('{"checkpoints": "a=b", "ta')
    (tmp_path / "trainrun").mkdir()
    (tmp_path / "trainrun" / "train_config.json").write_text("{}")
    _damaged_copies(tmp_path)
    return tmp_path


def _damaged_copies(root) -> None:
    """Copies of the good checkpoint, each with one file damaged or hostile."""
    def copy(name: str):
        shutil.copytree(root / "good", root / name)
        return root / name
    config = json.loads((root / "good" / "config.json").read_text())
    (copy("listconfig") / "config.json").write_text("[1, 2]")
    (copy("typedconfig") / "config.json").write_text(json.dumps({**config, "architectures": 5}))
    (copy("blockless") / "config.json").write_text(json.dumps({**config, "n_layer": -3}))
    (copy("torntokenizer") / "tokenizer.json").write_text('{"model": {"type": "WordLevel", "vocab": {"w0": 0')
    (copy("deeptokenizer") / "tokenizer.json").write_text("[" * 100_000 + "]" * 100_000)
    (copy("listdescription") / "forethought.json").write_text("[]")
    (copy("typeddescription") / "forethought.json").write_text('{"data": 5}')
    pickled = copy("pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload()))


class _Payload:
    """A pickle that, if loaded without ``weights_only``, would write a file into the working folder."""

    def __reduce__(self):
        return (Path.touch, (Path("PWNED"),))


def _files(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("command, argv, pattern", CASES, ids=[f"{c} {' '.join(a)}" for c, a, _ in CASES])
def test_bad_input_is_one_line_and_writes_nothing(workdir, capsys, command, argv, pattern):
    before = _files(workdir)
    code = main([*command.split(), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("forethought: error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert _files(workdir) == before  # nothing written, nothing changed


def test_every_numeric_setting_has_a_range():
    """A new int or float setting of any command needs a rule in core.settings.RULES."""
    from dataclasses import fields

    from forethought.analyses.cli import COMMANDS
    from forethought.analyses.compare import CompareConfig
    from forethought.core.settings import RULES, nested_settings
    from forethought.models.lm import LMTrainConfig
    from forethought.models.train import TrainSettings

    configs = [command.config_class() for command in COMMANDS.values()]
    configs += [kind for config in configs for kind in nested_settings(config).values()]
    assert CompareConfig in configs and LMTrainConfig in configs and TrainSettings in configs
    numeric = {f.name for config in configs for f in fields(config)
               if re.match(r"(int|float)\b", str(f.type))}
    assert numeric - set(RULES) == set()
