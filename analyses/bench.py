"""``forethought bench``: speed and memory, always as ratios against a baseline measured in the same run.

``bench train``: one training step (forward, next-token loss, backward, clipping, AdamW — the step of
``forethought train``) of a GPT-2 language model, vanilla (PyTorch fused attention) vs myopic (flash
attention + diagonal correction) vs naive myopic (materialised T×T scores, as in the paper's code): tokens/s
and peak memory, as ratios to vanilla. Variants alternate round by round so drift hits all of them alike.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass

import pandas as pd
import torch

from models.errors import ForethoughtError
from models.gpt2 import build_lm, gpt2_config
from models.myopic import myopic
from models.tasks.text import next_token_loss
from models.train import resolve_device


@dataclass
class TrainBenchConfig:
    """Settings of ``forethought bench train``; unset sizes follow the device (GPT-2 small, T = 1024 on a GPU)."""

    device: str = "auto"  # "auto": CUDA when available
    n_layer: int | None = None  # GPU: 12, CPU: 4
    d_model: int | None = None  # GPU: 768, CPU: 256
    n_head: int | None = None  # GPU: 12, CPU: 4
    vocab_size: int | None = None  # GPU: 50257, CPU: 1000
    seq_len: int | None = None  # GPU: 1024, CPU: 256
    batch_size: int | None = None  # GPU: 16, CPU: 8
    steps: int = 10  # timed steps per round
    rounds: int = 3  # rounds; each variant's time is the median over rounds
    warmup: int = 3  # untimed steps per variant before timing
    compile: bool = False  # torch.compile the model (GPU)

    def resolved(self) -> TrainBenchConfig:
        device = str(resolve_device(self.device))
        sizes = GPU_SIZES if device.startswith("cuda") else CPU_SIZES
        filled = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in sizes.items()}
        return TrainBenchConfig(**{**self.__dict__, **filled, "device": device})


GPU_SIZES = dict(n_layer=12, d_model=768, n_head=12, vocab_size=50257, seq_len=1024, batch_size=16)
CPU_SIZES = dict(n_layer=4, d_model=256, n_head=4, vocab_size=1000, seq_len=256, batch_size=8)
VARIANTS = {"vanilla": None, "myopic (fast)": "fast", "myopic (naive)": "reference"}


def bench_train(config: TrainBenchConfig) -> pd.DataFrame:
    """Seconds per training step and peak memory per variant, with ratios to vanilla."""
    config = config.resolved()
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ForethoughtError("bench: --device cuda asked for, but no CUDA device is available")
    model_config = gpt2_config(config.n_layer, config.d_model, config.n_head,
                               vocab_size=config.vocab_size, n_positions=config.seq_len)
    model = build_lm(model_config, seed=0).to(device).train()
    runnable = torch.compile(model) if config.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (config.batch_size, config.seq_len), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = next_token_loss(runnable(tokens, use_cache=False).logits, tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def run(impl: str | None, n_steps: int) -> float:
        mode = myopic(model, impl=impl) if impl else contextlib.nullcontext()
        with mode:
            _sync(device)
            start = time.perf_counter()
            for _ in range(n_steps):
                step()
            _sync(device)
        return (time.perf_counter() - start) / max(n_steps, 1)

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    memory: dict[str, float | None] = {}
    for name, impl in VARIANTS.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run(impl, config.warmup)
        memory[name] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    for _ in range(config.rounds):
        for name, impl in VARIANTS.items():
            times[name].append(run(impl, config.steps))

    seconds = {name: statistics.median(values) for name, values in times.items()}
    table = pd.DataFrame({
        "variant": list(VARIANTS),
        "ms_per_step": [1000 * seconds[name] for name in VARIANTS],
        "ratio_to_vanilla": [seconds[name] / seconds["vanilla"] for name in VARIANTS],
        "peak_memory_gib": [memory[name] for name in VARIANTS],
        "memory_ratio_to_vanilla": [
            memory[name] / memory["vanilla"] if memory[name] is not None else None for name in VARIANTS
        ],
        "tokens_per_s": [config.batch_size * config.seq_len / seconds[name] for name in VARIANTS],
    })
    table.attrs["setting"] = (
        f"{device.type}, GPT-2 {config.n_layer} layers × d_model {config.d_model}, vocab {config.vocab_size}, "
        f"T={config.seq_len}, batch {config.batch_size}, {'bf16 autocast, ' if device.type == 'cuda' else ''}"
        f"{'compiled, ' if config.compile else ''}median of {config.rounds} rounds × {config.steps} steps"
    )
    return table


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
