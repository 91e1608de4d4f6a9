"""``forethought bench``: speed and memory, always as ratios against a baseline measured in the same run.

``bench probe``: caching residuals, and fitting the (layer, τ) future-token probe grid in one torch pass vs
one sklearn ``LogisticRegression`` per probe on a small vocabulary subset, at their held-out accuracies.

``bench cache``: residual caching (forward hooks on the model's blocks, float16 writes of every residual layer,
the weights digest) and reading residuals through the hooks and through TransformerLens's bridge, against a bare
Hugging Face forward pass with ``output_hidden_states=True`` on the same tokens, at the same precision: tokens/s
and their ratio (default model: SmolLM2-135M).

``bench grid``: the probing grid of ``forethought probe`` end to end on one model (caching, the probes, the logit
lens, and the same for the random-init control), each step's wall time ÷ one bare forward pass of the model over
the same held-out tokens (the grid's floor: one such pass per model probed).

``bench paths``: the causal test's edited runs (the loss at t … t + τ when h[l, t] is edited, what ``forethought
intervene`` runs for every edit), from cached prefixes with the blocks under the edit replayed vs whole prefixes
0 … t + τ + 1, per layer edited: seconds per edited (sequence, position) and their ratio.

``bench pathstar``: generating, writing and parsing path-star text files, vectorised vs line by line.

``bench side-by-side``: a forethought command run twice one after the other and twice started together, each in
its own process with the threads the command line chooses: the wall times and their ratio.

``bench train``: one training step (forward, next-token loss, backward, clipping, AdamW — the step of
``forethought train``) of a language model (``--model``: GPT-2, Llama or GPT-NeoX at the bench sizes, or a
real model), vanilla (PyTorch fused attention) vs myopic (flash attention + diagonal correction; GPT-2 only)
vs naive myopic (materialised T×T scores, as in the paper's code): tokens/s and peak memory, as ratios to
vanilla. Variants alternate round by round so drift hits all of them alike.
"""

from __future__ import annotations

import contextlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from transformers import GPTNeoXConfig, LlamaConfig, PreTrainedModel

from forethought.analyses.cli import build_parser
from forethought.analyses.engine import probe_checkpoints
from forethought.analyses.probing import ProbeSettings
from forethought.core.errors import ForethoughtError
from forethought.core.files import file_digest
from forethought.core.offsets import at_offset
from forethought.core.precision import autocast, check_precision
from forethought.core.settings import as_text, check_settings
from forethought.core.threads import available_cores
from forethought.models.families import decoder_blocks
from forethought.models.gpt2 import build_lm, gpt2_config, load_model
from forethought.models.heldout import token_losses
from forethought.models.lm import LMCheckpoint
from forethought.models.myopic import myopic
from forethought.models.sources import model_folder
from forethought.models.tasks.pathstar import PathStarData, PathStarSpec, format_line, generate, parse_line
from forethought.models.tasks.text import TextData, gpt2_tokenizer, next_token_loss
from forethought.models.train import resolve_device
from forethought.probes.cache import build_cache
from forethought.probes.future import FutureProbeConfig, fit_future_probes
from forethought.probes.interventions import AddVector
from forethought.probes.paths import edited_positions, path_effects
from forethought.probes.residuals import bridge_residuals, load_bridge, read_layers


@dataclass
class TrainBenchConfig:
    """Settings of ``forethought bench train``; unset sizes follow the device (GPT-2 small, T = 1024 on a GPU)."""

    model: str = "gpt2"  # a family at the sizes below (gpt2, llama, gpt-neox), or a model source at its own size
    device: str = "auto"  # "auto": CUDA when available
    n_layer: int | None = None  # blocks of the model timed (default: 12 on a GPU, 4 on the CPU)
    d_model: int | None = None  # width of the model timed (default: 768 on a GPU, 256 on the CPU)
    n_head: int | None = None  # attention heads; llama: half as many for keys (default: 12 on a GPU, 4 on the CPU)
    vocab_size: int | None = None  # vocabulary of the model timed (default: 50257 on a GPU, 1000 on the CPU)
    seq_len: int | None = None  # tokens per sequence (default: 1024 on a GPU, 256 on the CPU)
    batch_size: int | None = None  # sequences per step (default: 16 on a GPU, 8 on the CPU)
    steps: int = 10  # timed steps per round
    rounds: int = 3  # rounds; each variant's time is the median over rounds
    warmup: int = 3  # untimed steps per variant before timing
    compile: bool = False  # torch.compile the model (GPU)

    def resolved(self) -> TrainBenchConfig:
        device = str(resolve_device(self.device))
        sizes = GPU_SIZES if device.startswith("cuda") else CPU_SIZES
        filled = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in sizes.items()}
        return TrainBenchConfig(**{**self.__dict__, **filled, "device": device})

    def __post_init__(self):
        check_settings(self)


GPU_SIZES = dict(n_layer=12, d_model=768, n_head=12, vocab_size=50257, seq_len=1024, batch_size=16)
CPU_SIZES = dict(n_layer=4, d_model=256, n_head=4, vocab_size=1000, seq_len=256, batch_size=8)
VARIANTS = {"vanilla": None, "myopic (fast)": "fast", "myopic (naive)": "reference"}
BENCH_FAMILIES = ("gpt2", "llama", "gpt-neox")


def bench_model(config: TrainBenchConfig) -> PreTrainedModel:
    """The model ``bench train`` times: a family at the config's sizes (random init, seed 0, sdpa attention),
    or a model source (folder, hub id, ``smollm2-135m``) at its own size."""
    if config.model not in BENCH_FAMILIES:
        return load_model(model_folder(config.model), kind="lm")
    if config.model == "gpt2":
        model_config = gpt2_config(config.n_layer, config.d_model, config.n_head, vocab_size=config.vocab_size,
                                   n_positions=config.seq_len)
    else:
        common = dict(vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=4 * config.d_model,
                      num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                      max_position_embeddings=config.seq_len, attn_implementation="sdpa")
        model_config = (LlamaConfig(**common, num_key_value_heads=max(1, config.n_head // 2)) if config.model == "llama"
                        else GPTNeoXConfig(**common, rotary_pct=0.25))
    return build_lm(model_config, seed=0)


def bench_train(config: TrainBenchConfig) -> pd.DataFrame:
    """Seconds per training step and peak memory per variant, with ratios to vanilla."""
    config = config.resolved()
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ForethoughtError("bench: `device` cuda asked for, but no CUDA device is available")
    model = bench_model(config).to(device).train()
    vocab_size = model.config.vocab_size
    runnable = torch.compile(model) if config.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, vocab_size, (config.batch_size, config.seq_len), device=device)
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
    # the same ratio within each round (variants alternate): its spread is how much the machine's noise moves it
    round_ratios = {name: [t / v for t, v in zip(times[name], times["vanilla"])] for name in VARIANTS}
    table = pd.DataFrame({
        "variant": list(VARIANTS),
        "ms_per_step": [1000 * seconds[name] for name in VARIANTS],
        "ratio_to_vanilla": [seconds[name] / seconds["vanilla"] for name in VARIANTS],
        "round_ratio_min": [min(round_ratios[name]) for name in VARIANTS],
        "round_ratio_max": [max(round_ratios[name]) for name in VARIANTS],
        "peak_memory_gib": [memory[name] for name in VARIANTS],
        "memory_ratio_to_vanilla": [
            memory[name] / memory["vanilla"] if memory[name] is not None else None for name in VARIANTS
        ],
        "tokens_per_s": [config.batch_size * config.seq_len / seconds[name] for name in VARIANTS],
    })
    table.attrs["setting"] = (
        f"{device.type}, {type(model).__name__.removesuffix('ForCausalLM').removesuffix('LMHeadModel')} "
        f"{model.config.num_hidden_layers} layers × d_model {model.config.hidden_size}, vocab {vocab_size}, "
        f"T={config.seq_len}, batch {config.batch_size}, {'bf16 autocast, ' if device.type == 'cuda' else ''}"
        f"{'compiled, ' if config.compile else ''}median of {config.rounds} rounds × {config.steps} steps"
    )
    return table


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class ProbeBenchConfig:
    """Settings of ``forethought bench probe``: cache throughput, probe-fitting throughput, and the same probe
    grid fitted by sklearn ``LogisticRegression`` on a small vocabulary subset (the K most frequent tokens +
    "other"), as a time ratio beside both held-out accuracies. Model: GPT-2 architecture at random init, run
    on held-out text of the embedded corpus. Unset sizes follow the device."""

    device: str = "auto"  # "auto": CUDA when available
    n_layer: int | None = None  # blocks of the model timed (default: 12 on a GPU, 4 on the CPU)
    d_model: int | None = None  # width of the model timed (default: 768 on a GPU, 256 on the CPU)
    n_sequences: int | None = None  # sequences of 64 tokens probed (default: 4096 on a GPU, 256 on the CPU)
    taus: tuple[int, ...] = (1, 2, 3, 4)  # offsets τ of the probes fitted (τ = 1: the next token)
    classes: int = 20  # K: the vocabulary subset both fitters predict (+ "other")
    epochs: int = 10  # torch probe epochs (early stopping may end sooner)
    sklearn_max_iter: int = 200  # L-BFGS iterations per sklearn probe
    folder: str = "runs/bench-probe"  # a temporary folder for the model and the cache is made (and removed) here

    def resolved(self) -> ProbeBenchConfig:
        device = str(resolve_device(self.device))
        sizes = dict(n_layer=12, d_model=768, n_sequences=4096) if device.startswith("cuda") else \
            dict(n_layer=4, d_model=256, n_sequences=256)
        filled = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in sizes.items()}
        return ProbeBenchConfig(**{**self.__dict__, **filled, "device": device})

    def __post_init__(self):
        check_settings(self)
        if max(self.taus) >= TextData().seq_len:
            raise ForethoughtError(f"taus reach {max(self.taus)}, but the benchmark's sequences have "
                                   f"{TextData().seq_len} tokens")


def bench_probe(config: ProbeBenchConfig) -> pd.DataFrame:
    """Seconds and throughput of caching and of fitting the (layer, τ) probe grid, torch vs sklearn.

    Model and cache go to a temporary folder under ``config.folder``, removed afterwards (nothing else there is
    touched)."""
    config = config.resolved()
    Path(config.folder).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=config.folder, prefix="bench-") as work:
        return _bench_probe(config, Path(work))


def _bench_probe(config: ProbeBenchConfig, folder: Path) -> pd.DataFrame:
    tokenizer = gpt2_tokenizer()
    tokens = TextData().load(tokenizer)["train"][: config.n_sequences]
    model = build_lm(gpt2_config(config.n_layer, config.d_model, config.d_model // 64 or 1), seed=0)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    layers, taus = list(range(config.n_layer + 1)), sorted(set(config.taus))

    start = time.perf_counter()
    cache = build_cache(folder / "model", tokens, folder / "cache", layers, device=config.device, progress=False)
    cache_seconds = time.perf_counter() - start
    cache_bytes = sum(p.stat().st_size for p in (folder / "cache").glob("layer_*.npy"))
    start = time.perf_counter()  # what reading the cache back adds: each file's content digest, once
    for name in cache.meta["digests"]:
        file_digest(cache.folder / name)
    digest_seconds = time.perf_counter() - start

    probe_config = FutureProbeConfig(kind="topk", top_k=config.classes, lr=1e-2, max_epochs=config.epochs,
                                     device=config.device)
    split = probe_config.split(tokens)  # both ways learn from the same sequences and predict the same classes
    start = time.perf_counter()
    fitted, scores = fit_future_probes(cache, layers, taus, probe_config, vocab_size=len(tokenizer), split=split)
    torch_seconds = time.perf_counter() - start
    torch_accuracy = scores.table().query("metric == 'top1'")["value"].mean()

    train, test = split.train, split.test
    lookup = np.full(len(tokenizer), config.classes)
    lookup[split.classes] = np.arange(config.classes)
    positions = tokens.shape[1] - max(taus)
    start, accuracies = time.perf_counter(), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for layer in layers:
            features = cache.layer(layer)[:, :positions].astype(np.float32)
            for tau in taus:
                labels = lookup[at_offset(tokens, tau, positions)]
                scaler = StandardScaler().fit(features[train].reshape(-1, config.d_model))
                probe = LogisticRegression(max_iter=config.sklearn_max_iter).fit(
                    scaler.transform(features[train].reshape(-1, config.d_model)), labels[train].ravel())
                predicted = probe.predict(scaler.transform(features[test].reshape(-1, config.d_model)))
                accuracies.append(float((predicted == labels[test].ravel()).mean()))
    sklearn_seconds = time.perf_counter() - start
    unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)

    n_tokens, n_probes = tokens.size, len(layers) * len(taus)
    fit_examples = (1 - probe_config.validation_fraction) * len(train) * positions  # per probe and epoch
    table = pd.DataFrame({
        "step": ["cache (forward + write)", "cache digests (checked when read)", "probes: torch, one pass",
                 "probes: sklearn, one per (layer, τ)"],
        "seconds": [cache_seconds, digest_seconds, torch_seconds, sklearn_seconds],
        "tokens_per_s": [n_tokens / cache_seconds, n_tokens / digest_seconds, None, None],
        "probe_examples_per_s": [None, None, fit_examples * n_probes * len(fitted.history) / torch_seconds, None],
        "gb_per_s": [cache_bytes / cache_seconds / 1e9, cache_bytes / digest_seconds / 1e9, None, None],
        "probes": [None, None, n_probes, n_probes],
        "mean_top1": [None, None, torch_accuracy, float(np.mean(accuracies))],
        "speedup_vs_sklearn": [None, None, sklearn_seconds / torch_seconds, 1.0],
    })
    table.attrs["setting"] = (
        f"{config.device}, GPT-2 {config.n_layer} layers × d_model {config.d_model} (random init), "
        f"{config.n_sequences} sequences × {tokens.shape[1]} tokens of the embedded corpus, τ ∈ {taus}, "
        f"{config.classes} most frequent tokens + other; sklearn lbfgs stopped at max_iter "
        f"{config.sklearn_max_iter} in {unconverged} of {n_probes} probes"
    )
    return table


HF_FORWARD = "Hugging Face forward (output_hidden_states)"
CACHING = "caching (forward hooks, float16 writes, digest)"


@dataclass
class CacheBenchConfig:
    """Settings of ``forethought bench cache``: residual caching through the TransformerBridge (forward pass and
    float16 writes of all L + 1 residual layers) ÷ a bare Hugging Face forward pass returning every hidden state,
    on the same held-out tokens of the embedded corpus, at the same precision."""

    model: str = "smollm2-135m"  # any model source (folder, run folder, hub id, smollm2-135m, gguf:PATH)
    corpus: str = "embedded"  # held-out text: test documents of this corpus, packed into sequences
    tokens_root: str = "runs/tokens"  # token files are written (once) under here
    device: str = "auto"  # "auto": CUDA when available
    precision: str = "bfloat16"  # float32 or bfloat16 (autocast), for both
    n_sequences: int = 512  # sequences of `seq_len` tokens per round (fixed costs — weights hash, files — amortise)
    seq_len: int = 64  # tokens per held-out sequence
    batch_size: int = 32  # sequences per forward pass
    rounds: int = 3  # rounds, alternating the two; each one's throughput is the median over rounds
    folder: str = "runs/bench-cache"  # a temporary folder for the caches is made (and removed) here

    def __post_init__(self):
        check_settings(self)
        check_precision(self.precision)
        if min(self.n_sequences, self.seq_len, self.batch_size, self.rounds) < 1:
            raise ForethoughtError("n_sequences, seq_len, batch_size and rounds must be at least 1")


def bench_cache(config: CacheBenchConfig) -> pd.DataFrame:
    """Tokens/s of caching (forward hooks on the model's blocks, float16 writes, the weights digest) and of reading
    the residuals through the hooks and through a TransformerLens bridge, each ÷ the bare Hugging Face forward pass
    with hidden states (the physical limit: every route runs that pass)."""
    device = str(resolve_device(config.device))
    checkpoint = LMCheckpoint.load(config.model)
    model = checkpoint.model.to(device).eval()
    data = TextData(corpus=config.corpus, layout="packed", seq_len=config.seq_len)
    tokens = data.load(checkpoint.tokenizer, config.tokens_root)["test"][: config.n_sequences]
    batches = torch.from_numpy(tokens).split(config.batch_size)
    bridge = load_bridge(checkpoint.source, device=device)  # warm: booting is not caching
    layers = list(range(len(decoder_blocks(model)) + 1))
    forwards = {
        HF_FORWARD: lambda batch: model(batch, output_hidden_states=True, use_cache=False),
        "forward hooks (residuals, no writes)": lambda batch: read_layers(model, batch, layers),
        "TransformerLens bridge (residuals, no writes)": lambda batch: bridge_residuals(bridge, batch),
    }
    with torch.no_grad(), autocast(device, config.precision):  # warm-up, untimed
        for forward in forwards.values():
            forward(batches[0].to(device))
    Path(config.folder).mkdir(parents=True, exist_ok=True)
    seconds: dict[str, list[float]] = {name: [] for name in [*forwards, CACHING]}
    with tempfile.TemporaryDirectory(dir=config.folder, prefix="bench-") as work:
        for round_ in range(config.rounds):
            for name, forward in forwards.items():
                start = time.perf_counter()
                with torch.no_grad(), autocast(device, config.precision):
                    for batch in batches:
                        forward(batch.to(device))
                _synchronize(device)
                seconds[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            build_cache(checkpoint, tokens, Path(work) / f"cache-{round_}", batch_size=config.batch_size,
                        device=device, progress=False, precision=config.precision)
            seconds[CACHING].append(time.perf_counter() - start)
    rates = {name: tokens.size / statistics.median(times) for name, times in seconds.items()}
    baseline = rates[HF_FORWARD]
    table = pd.DataFrame({"step": list(rates), "tokens_per_s": list(rates.values()),
                          "ratio_to_hugging_face": [rate / baseline for rate in rates.values()]})
    table.attrs["setting"] = (f"{device}, {config.model} ({type(model).__name__}, {model.config.num_hidden_layers} "
                              f"layers), {config.precision}, {len(tokens)} sequences × {config.seq_len} tokens, "
                              f"batch {config.batch_size}, median of {config.rounds} alternating rounds")
    return table


@dataclass
class GridBenchConfig(ProbeSettings):
    """Settings of ``forethought bench grid``: ``forethought probe``'s settings (defaults: the README's SmolLM2
    grid — 31 layers × τ 1–4, top-K 1,000, the lens, the control, 2,000 Gutenberg sequences × 64 tokens, of which
    400 test the probes) for one model; each step's wall time ÷ a bare forward pass over the same tokens."""

    model: str = "smollm2-135m"  # any model source (folder, run folder, hub id, smollm2-135m, gguf:PATH)
    corpus: str | None = "embedded:gutenberg"  # held-out text: the test documents of this corpus
    layout: str = "packed"
    kind: str = "topk"
    precision: str = "bfloat16"
    batch_sequences: int = 32  # sequences per minibatch (cache writing and probe fitting)
    max_epochs: int = 4  # at most this many passes over the probes' training split
    progress: bool = False  # show progress bars
    folder: str = "runs/bench-grid"  # a temporary run folder is made (and removed) here


def bench_grid(config: GridBenchConfig) -> pd.DataFrame:
    """Seconds of each step of the probing grid (the run's own ``meta.json`` record) and of the whole, each ÷ one
    bare Hugging Face forward pass with hidden states over the held-out tokens, at the same precision and batch."""
    device = str(resolve_device(config.device))
    checkpoint = LMCheckpoint.load(config.model)
    Path(config.folder).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=config.folder, prefix="bench-") as work:
        started = time.perf_counter()
        run = probe_checkpoints(config, {"model": checkpoint}, Path(work) / "run")
        total = time.perf_counter() - started
    model = checkpoint.model.to(device).eval()
    batches = torch.from_numpy(run.tokens).split(config.batch_sequences)
    with torch.no_grad(), autocast(device, config.precision):
        model(batches[0].to(device), output_hidden_states=True, use_cache=False)  # warm-up, untimed
        started = time.perf_counter()
        for batch in batches:
            model(batch.to(device), output_hidden_states=True, use_cache=False)
        _synchronize(device)
    forward = time.perf_counter() - started
    seconds = {**run.engine.seconds, "the whole grid (the steps above, count baselines, tables)": total}
    table = pd.DataFrame({"step": list(seconds), "seconds": list(seconds.values()),
                          "ratio_to_forward": [value / forward for value in seconds.values()]})
    table.attrs["setting"] = (f"{device}, {config.model}, {config.precision}, {run.tokens.shape[0]:,} sequences × "
                              f"{run.tokens.shape[1]} tokens (test: {len(run.split.test):,} from "
                              f"{len(set(run.engine.sample.clusters[run.split.test].tolist()))} documents), "
                              f"{len(run.engine.layers('model'))} layers × τ {as_text(config.tau_list())}, "
                              f"{config.kind}{f' K = {config.top_k}' if config.kind == 'topk' else ''}, "
                              f"{config.max_epochs} epochs at most; one bare forward pass: {forward:.1f} s "
                              f"(the grid runs {' and '.join(run.engine.names)}: one pass each)")
    return table


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()

@dataclass
class PathsBenchConfig:
    """Settings of ``forethought bench paths``: the causal test's edited runs (in float32, as ``forethought
    intervene`` runs them) from cached prefixes with the blocks under the edited layer replayed — the default — ÷
    whole prefixes (the plain way: every edited run from position 0), at a few layers, on the same held-out tokens.
    Only edited runs are timed: the clean parts (prefix caches, unedited losses), computed once per model and shared
    by the test's hundreds of edits, are run first."""

    model: str = "smollm2-135m"  # any model source (folder, run folder, hub id, smollm2-135m, gguf:PATH)
    corpus: str = "embedded"  # held-out text: test documents of this corpus, packed into sequences
    tokens_root: str = "runs/tokens"  # token files are written (once) under here
    device: str = "auto"  # "auto": CUDA when available
    layers: tuple[int, ...] = (0, 15, 30)  # residual layers edited (SmolLM2-135M's 0 … 30; pick others for others)
    tau: int = 4  # the losses read: at t … t + τ (the causal test's largest τ)
    positions: int = 4  # positions t edited per sequence (evenly spaced, as in the causal test)
    n_sequences: int = 32  # held-out sequences of `seq_len` tokens
    seq_len: int = 64  # tokens per held-out sequence
    batch_size: int = 32  # sequences per forward pass
    rounds: int = 3  # rounds, alternating the two ways; each one's time is the median over rounds

    def __post_init__(self):
        check_settings(self)
        if not self.layers or min(self.layers) < 0:
            raise ForethoughtError(f"layers must be residual layers ≥ 0, got {as_text(self.layers) or 'none'}")
        if self.tau + 2 > self.seq_len:
            raise ForethoughtError(f"tau {self.tau} needs sequences of at least {self.tau + 2} tokens; seq_len is "
                                   f"{self.seq_len}")


def bench_paths(config: PathsBenchConfig) -> pd.DataFrame:
    """Milliseconds per edited (sequence, position) of the causal test's edited runs, cached and replayed ÷ whole
    prefixes, at each layer (checked to give the same effects to 1e-4 nats)."""
    device = resolve_device(config.device)
    checkpoint = LMCheckpoint.load(config.model)
    model = checkpoint.model.to(device).float().eval()
    last = len(decoder_blocks(model))
    if max(config.layers) > last:
        raise ForethoughtError(f"layers reach {max(config.layers)}, but {config.model} has residual layers 0 … {last}")
    data = TextData(corpus=config.corpus, layout="packed", seq_len=config.seq_len)
    tokens = torch.from_numpy(data.load(checkpoint.tokenizer, config.tokens_root)["test"][: config.n_sequences])
    positions = edited_positions(tokens.shape[1], config.positions, config.tau)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ways = {"cached prefixes, blocks under l replayed": {},
            "whole prefixes": dict(losses=token_losses, lag=1)}
    rows = []
    for layer in config.layers:
        edit_at = partial(lambda i, layer: AddVector(layer, positions=i, vector=direction), layer=layer)
        clean: dict[str, dict] = {way: {} for way in ways}
        effects = {way: path_effects(model, tokens, edit_at, positions, config.tau, config.batch_size,  # untimed:
                                     clean[way], **options) for way, options in ways.items()}  # the clean parts
        cached, whole = effects.values()
        if not np.allclose(cached, whole, rtol=0, atol=1e-4):  # float32 rounding: ~1e-5 nats on SmolLM2
            raise ForethoughtError("the cached and the whole-prefix effects disagree")  # a bug, never expected
        seconds: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(config.rounds):
            for way, options in ways.items():
                start = time.perf_counter()
                path_effects(model, tokens, edit_at, positions, config.tau, config.batch_size, clean[way], **options)
                _synchronize(str(device))
                seconds[way].append(time.perf_counter() - start)
        edited = len(tokens) * len(positions)
        fast, plain = (statistics.median(times) / edited for times in seconds.values())
        rows.append({"layer": layer, "cached_replayed_ms": 1000 * fast, "whole_prefixes_ms": 1000 * plain,
                     "speedup": plain / fast})
    table = pd.DataFrame(rows)
    table.attrs["setting"] = (f"{device}, {config.model} ({type(model).__name__}, {last} layers), float32, "
                              f"{len(tokens)} sequences × {config.seq_len} tokens, positions {positions}, losses at "
                              f"t … t + {config.tau}, batch {config.batch_size}; ms per edited (sequence, position), "
                              f"median of {config.rounds} alternating rounds")
    return table


@dataclass
class PathStarBenchConfig:
    """Settings of ``forethought bench pathstar``: generating path-star samples, writing them in the paper's text
    format and parsing them back, vectorised (what ``pathstar-data`` and ``--train-file`` use) vs line by line
    (a Python loop over one line at a time: models/tasks/pathstar.py's ``format_line`` / ``parse_line``)."""

    degree: int = 5  # d: arms leaving the start node
    length: int = 5  # l: nodes on the path, start included
    n_nodes: int = 50  # N: labels 0 … N − 1
    n_train: int = 200000  # samples written and parsed
    seed: int = 0  # seeds the graphs drawn

    def __post_init__(self):
        check_settings(self)
        PathStarSpec(self.degree, self.length, self.n_nodes)  # validates d, l, N


def bench_pathstar(config: PathStarBenchConfig) -> pd.DataFrame:
    """Seconds of each step, vectorised and line by line, on the same samples (checked to agree)."""
    started = time.perf_counter()
    data = generate(PathStarSpec(config.degree, config.length, config.n_nodes), config.n_train,
                    np.random.default_rng(config.seed))
    seconds = {"generate": (time.perf_counter() - started, None)}
    started = time.perf_counter()
    text = data.text()
    fast = time.perf_counter() - started
    started = time.perf_counter()
    loop_text = "".join(format_line(edges, path) + "\n" for edges, path in zip(data.edges, data.path))
    seconds["write text"] = (fast, time.perf_counter() - started)
    started = time.perf_counter()
    parsed = PathStarData.from_text(text)
    fast = time.perf_counter() - started
    started = time.perf_counter()
    looped = [parse_line(line, number) for number, line in enumerate(loop_text.splitlines(), 1)]
    seconds["parse text"] = (fast, time.perf_counter() - started)
    if text != loop_text or not np.array_equal(parsed.edges, np.stack([edges for edges, _ in looped])):
        raise ForethoughtError("the vectorised and the line-by-line text disagree")  # a bug, never expected
    table = pd.DataFrame([{"step": step, "vectorised_s": fast, "line_by_line_s": loop,
                           "speedup": None if loop is None else loop / fast} for step, (fast, loop) in seconds.items()])
    table.attrs["setting"] = (f"{config.n_train:,} samples of {data.spec}, {len(text) / 2**20:.0f} MiB of text, "
                              "one process")
    return table


@dataclass
class SideBySideBenchConfig:
    """Settings of ``forethought bench side-by-side``: one forethought command run twice one after the other, then
    twice started together (each in its own process, its threads chosen by the rule of docs/performance.md unless
    the command gives ``--threads``): the wall times and their ratio (target ≤ 1.3 on 2 cores)."""

    command_line: str = "bench train --steps 3 --rounds 3 --warmup 1"  # a forethought command writing no run folder
    rounds: int = 1  # pairs of (one after the other, together), alternating; the ratio is of the medians

    def __post_init__(self):
        check_settings(self)
        words = shlex.split(self.command_line)
        if words[:2] == ["bench", "side-by-side"]:
            raise ForethoughtError("bench side-by-side cannot time itself")
        try:
            build_parser().parse_args(words)
        except ForethoughtError as error:
            raise ForethoughtError(f"`command_line` {self.command_line!r} is not a forethought command: "
                                   f"{error}") from None


def bench_side_by_side(config: SideBySideBenchConfig) -> pd.DataFrame:
    """Wall seconds of two runs of ``config.command_line``, one after the other and started together; their ratio."""
    command = [sys.executable, "-m", "forethought", *shlex.split(config.command_line)]

    def run_together(n: int) -> float:
        started = time.perf_counter()
        runs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for _ in range(n)]
        for run in runs:
            _, error = run.communicate()
            if run.returncode:
                last = error.strip().splitlines()[-1] if error.strip() else f"exit {run.returncode}"
                raise ForethoughtError(f"`forethought {config.command_line}` failed: {last}")
        return time.perf_counter() - started

    seconds: dict[str, list[float]] = {"one after the other": [], "started together": []}
    for _ in range(config.rounds):
        seconds["one after the other"].append(run_together(1) + run_together(1))
        seconds["started together"].append(run_together(2))
    walls = {name: statistics.median(times) for name, times in seconds.items()}
    ratios = [wall / walls["one after the other"] for wall in walls.values()]
    table = pd.DataFrame({"way": list(walls), "wall_s": list(walls.values()), "ratio_to_one_after_the_other": ratios})
    table.attrs["setting"] = (f"two runs of `forethought {config.command_line}`, {available_cores()} cores, "
                              f"median of {config.rounds} rounds")
    return table
