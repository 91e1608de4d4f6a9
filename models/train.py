"""The training loop: AdamW, cosine schedule with warm-up, clipping, optional myopic gradient, exact resume.

A run lives in one folder. Every ``checkpoint_every`` steps (and at the end) it writes an atomic checkpoint
(:mod:`models.checkpoint`); calling :func:`train` again on the same folder resumes from the newest one and,
on the CPU, ends with exactly the weights of an uninterrupted run. A NaN/inf loss stops the run with an
error naming the step, leaving the last good checkpoint as it was. Under ``torchrun`` the same loop runs
data-parallel (:mod:`models.distributed`): each process trains on its slice of every global batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel, get_cosine_schedule_with_warmup

from forethought.core.errors import ForethoughtError, one_line
from forethought.core.files import run_lock
from forethought.core.precision import TRAINING_PRECISIONS, check_precision, training_precision
from forethought.core.precision import autocast as precision_autocast
from forethought.core.progress import progress_bar
from forethought.core.settings import changed_settings, check_settings
from forethought.core.versions import package_versions
from forethought.models.checkpoint import (
    check_checkpoint,
    checkpoints_dir,
    latest_checkpoint,
    load_training_state,
    save_checkpoint,
)
from forethought.models.distributed import Distributed
from forethought.models.mtp import load_heads, without_heads
from forethought.models.myopic import check_cut, myopic


class Task(Protocol):
    """What the loop needs from a task: fresh batches and a loss.

    A task whose stream has state beyond the generator (an epoch cursor) also defines ``state_dict()`` and
    ``load_state_dict(state)``; the loop saves it with every checkpoint.
    """

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


@dataclass
class TrainSettings:
    """The optimisation settings every trained run shares, declared once: an experiment's config holds them as its
    ``training`` field (its own defaults, its paper's), and the command line, presets and run folders name them flat
    (``--lr``). Fields in ``RESUMABLE`` may change between a run and its resume."""

    batch_size: int = 64  # sequences per global batch (split over torchrun processes)
    lr: float = 1e-3  # peak learning rate of AdamW (cosine schedule after the warm-up)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_frac: float = 0.01  # fraction of steps spent warming up (at least one step)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    myopic_cut: str = "residual"  # where a myopic run cuts the gradient: 'residual' (the paper's) or 'kv'
    eval_every: int = 100  # steps between held-out evaluations
    eval_batches: int = 4  # held-out batches per evaluation
    checkpoint_every: int = 500  # steps between saved checkpoints (a rerun resumes from the last)
    keep_checkpoints: int = 2  # how many of the newest checkpoints are kept (older ones are deleted)
    precision: str = "auto"  # float32, bfloat16 (autocast; ~2× faster on AMX / AVX512-BF16 CPUs); auto: bf16 on CUDA
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~10–20 % slower
    compile: bool = False  # torch.compile the model (worth it on GPUs)

    RESUMABLE: ClassVar[tuple[str, ...]] = ("eval_every", "checkpoint_every", "keep_checkpoints",
                                            "gradient_checkpointing", "compile", "device", "progress")

    def __post_init__(self):
        check_settings(self)
        check_cut(self.myopic_cut)
        check_precision(self.precision, TRAINING_PRECISIONS)

    def epoch_steps(self, epochs: float, n_examples: int) -> int:
        """Optimiser steps for ``epochs`` passes over ``n_examples`` sequences (at least one)."""
        return max(1, math.ceil(epochs * n_examples / self.batch_size))

    def for_run(self, steps: int, seed: int, myopic: bool, device: str = "auto", progress: bool = True) -> TrainConfig:
        """These settings for one run of ``steps`` steps."""
        return TrainConfig(**asdict(self), steps=steps, seed=seed, myopic=myopic, device=device, progress=progress)


@dataclass
class TrainConfig(TrainSettings):
    """One run: the shared settings, its length and seed, whether it is myopic, and where it runs."""

    steps: int = 1000
    seed: int = 0  # data stream and dropout; model initialisation is seeded by its builder
    myopic: bool = False
    device: str = "auto"  # "auto": CUDA when available
    progress: bool = True

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def trajectory(self) -> dict[str, Any]:
        """The fields that determine the weights (a resume must match them)."""
        return {k: v for k, v in asdict(self).items() if k not in self.RESUMABLE}


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else the CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TrainingDiverged(ForethoughtError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    model: PreTrainedModel
    checkpoint: Path  # the final checkpoint folder
    history: list[dict[str, float]] = field(default_factory=list)  # {"step", "train_loss"[, "eval_loss"]}


def train(
    model: PreTrainedModel,
    task: Task,
    config: TrainConfig,
    run_dir: str | Path,
    eval_task: Task | None = None,
    save_extra: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``task`` in ``run_dir``, resuming from its newest checkpoint if there is one.

    ``eval_task`` (default: ``task``) gives the held-out batches; ``save_extra(folder)`` adds files (a
    tokenizer, a data description) to every checkpoint folder before it is renamed into place. The process
    that writes (rank 0) holds ``run_dir``'s lock throughout: a second writer is refused.
    """
    dist = Distributed.from_env(config.resolved_device())
    with run_lock(run_dir) if dist.is_main else contextlib.nullcontext():
        return _train(model, task, config, Path(run_dir), task if eval_task is None else eval_task, save_extra, dist)


def _train(model: PreTrainedModel, task: Task, config: TrainConfig, run_dir: Path, eval_task: Task,
           save_extra: Callable[[Path], None] | None, dist: Distributed) -> TrainResult:
    device = dist.device(config.resolved_device())
    model.to(device).train()
    if config.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ForethoughtError(f"{type(model).__name__} does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    runnable = dist.wrap(model)
    runnable = torch.compile(runnable) if config.compile else runnable
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, math.ceil(config.warmup_frac * config.steps))
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, config.steps)
    data = torch.Generator(device).manual_seed(config.seed)
    torch.manual_seed(config.seed)
    step, history = 0, []

    resume_from = latest_checkpoint(run_dir)
    if resume_from is not None:
        step, history = _resume(resume_from, model, optimizer, scheduler, data, task, config)
    eval_batches = _eval_batches(eval_task, config, device) if dist.is_main else []
    autocast = precision_autocast(device, training_precision(config.precision, device))
    last_checkpoint = resume_from

    def checkpoint() -> Path:
        state = {
            "step": step,
            "config": config.trajectory(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data_rng": data.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "task": task.state_dict() if hasattr(task, "state_dict") else None,
            "history": history,
            "versions": package_versions(),
            "threads": torch.get_num_threads(),
        }
        folder = checkpoints_dir(run_dir) / f"step-{step:07d}"
        if dist.is_main:
            folder = save_checkpoint(run_dir, step, model, state, keep=config.keep_checkpoints, extra=save_extra)
        dist.barrier()
        return folder

    mode = myopic(model, cut=config.myopic_cut) if config.myopic else contextlib.nullcontext()
    with mode, progress_bar(
        total=config.steps, initial=step, disable=not (config.progress and dist.is_main), desc=run_dir.name,
        leave=False,
    ) as bar:
        while step < config.steps:
            inputs, targets = task.sample(config.batch_size, data)  # the global batch, alike on every rank
            with autocast:
                loss = task.loss(runnable, dist.shard(inputs), dist.shard(targets))
            loss_value = dist.mean(loss.item())
            if not math.isfinite(loss_value):
                where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint yet"
                raise TrainingDiverged(f"loss is {loss_value} at step {step + 1} of {run_dir} ({where})")
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "train_loss": loss_value}
            if dist.is_main and (step % config.eval_every == 0 or step == config.steps):
                record["eval_loss"] = evaluate(model, eval_task, eval_batches, autocast)
                bar.set_postfix(eval_loss=f"{record['eval_loss']:.4f}")
            history.append(record)
            bar.update()
            if step % config.checkpoint_every == 0 or step == config.steps:
                last_checkpoint = checkpoint()
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    return TrainResult(model=model.eval(), checkpoint=last_checkpoint, history=history)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batches, autocast) -> float:
    """Mean task loss over fixed held-out batches."""
    was_training = model.training
    model.eval()
    with autocast:
        losses = [task.loss(model, inputs, targets).item() for inputs, targets in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def _eval_batches(task: Task, config: TrainConfig, device: torch.device):
    """Held-out batches from a stream disjoint from training's (seed + 1_000_003); a stateful task's
    training stream is left where it was."""
    generator = torch.Generator(device).manual_seed(config.seed + 1_000_003)
    state = task.state_dict() if hasattr(task, "state_dict") else None
    batches = [task.sample(config.batch_size, generator) for _ in range(config.eval_batches)]
    if state is not None:
        task.load_state_dict(state)
    return batches


def _resume(folder: Path, model, optimizer, scheduler, data: torch.Generator, task: Task, config: TrainConfig):
    check_checkpoint(folder)
    state = load_training_state(folder)
    defaults = TrainConfig().trajectory()  # a setting added since the run was saved had its default then
    saved = {k: v for k, v in state.get("config", {}).items() if k not in config.RESUMABLE}  # older runs bound more
    if changed := changed_settings(saved, config.trajectory(), defaults):
        raise ForethoughtError(f"cannot resume {folder}: it was trained with other settings ({changed})")
    try:
        saved_model = type(model).from_pretrained(folder)
        with without_heads(model) as heads:
            model.load_state_dict(saved_model.state_dict())
        if heads is not None:
            load_heads(heads, folder)
    except SafetensorError as error:  # a checkpoint written before digests were recorded, damaged since
        raise ForethoughtError(f"the weights in {folder} cannot be read (damaged or truncated: {one_line(error, 120)})"
                               "; remove that checkpoint to resume from the one before") from None
    except (RuntimeError, ValueError, OSError) as error:
        raise ForethoughtError(f"checkpoint {folder} does not match the model being trained: {one_line(error, 200)}"
                               ) from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    data.set_state(state["data_rng"])
    if state.get("task") is not None:
        task.load_state_dict(state["task"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["history"]
