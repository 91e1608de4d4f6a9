"""Data parallelism: two CPU processes (gloo) take exactly the steps of one process on the same global batch —
next-token, myopic, and multi-token prediction (whose extra heads live outside the model's forward)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from forethought.core.errors import ForethoughtError
from forethought.models.distributed import Distributed
from forethought.models.gpt2 import build_lm, gpt2_config
from forethought.models.mtp import HEADS_FILE, MultiTokenTask, add_heads
from forethought.models.tasks.text import TextTask
from forethought.models.train import TrainConfig, train

SEQUENCES = np.random.default_rng(0).integers(0, 23, size=(64, 12))
CONFIG = dict(steps=3, batch_size=8, lr=1e-2, warmup_frac=0.0, eval_every=3, eval_batches=1, checkpoint_every=3,
              device="cpu", progress=False)


def _model(heads: int):
    model = build_lm(gpt2_config(n_layer=2, d_model=16, n_head=2, vocab_size=23, n_positions=16), seed=0).double()
    add_heads(model, heads)
    return model


def _run(heads: int, myopic: bool, run_dir) -> object:
    model = _model(heads)
    task = MultiTokenTask(SEQUENCES, model) if heads > 1 else TextTask(SEQUENCES)
    return train(model, task, TrainConfig(**CONFIG, myopic=myopic), run_dir)


def _worker(rank: int, world_size: int, port: int, run_dir: str, myopic: bool, heads: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _run(heads, myopic, run_dir)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("myopic, heads", [(False, 1), (True, 1), (False, 3)])
def test_two_processes_take_the_single_process_steps(tmp_path, myopic, heads):
    single = _run(heads, myopic, tmp_path / "one")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two"), myopic, heads), nprocs=2, join=True)
    final = tmp_path / "two" / "checkpoints" / "step-0000003"
    weights = load_file(final / "model.safetensors")
    if heads > 1:
        weights.update({f"mtp_heads.{name}": value for name, value in load_file(final / HEADS_FILE).items()})
    initial = _model(heads).state_dict()
    for name, value in single.model.state_dict().items():
        if name in weights or name.startswith("mtp_heads."):
            torch.testing.assert_close(weights[name], value, atol=1e-12, rtol=1e-12, msg=name)
    assert not torch.equal(weights["transformer.h.0.attn.c_attn.weight"], initial["transformer.h.0.attn.c_attn.weight"])


def test_global_batch_must_split_evenly():
    with pytest.raises(ForethoughtError, match="batch size 6 is not divisible by the 4 processes of this job"):
        Distributed(rank=1, world_size=4).shard(torch.zeros(6, 3))
    assert Distributed(rank=1, world_size=2).shard(torch.arange(6)).tolist() == [3, 4, 5]


def test_torchrun_command_line(tmp_path):
    """The real entry point: ``torchrun --nproc_per_node 2 -m analyses train`` beside a single process."""
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"line {i}: " + "word " * (10 + i % 4)}) for i in range(300)))
    common = ["-m", "forethought", "train", "--corpus", str(corpus), "--model", "gpt2-micro", "--seq-len", "8",
              "--steps", "2", "--batch-size", "4", "--tokens-root", str(tmp_path / "tokens"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *common, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("checkpoint:") == 1  # one report, from rank 0
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = (load_file(tmp_path / run / "checkpoints" / "step-0000002" / "model.safetensors") for run in ("one", "two"))
    for name in a:  # float32: equal up to the order of the gradient all-reduce
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)
