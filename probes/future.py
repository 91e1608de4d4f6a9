"""Future-token probes: predict x[t+τ] from h[l, t], every (layer, τ) of a checkpoint fitted in one pass.

Kinds (torch, minibatches, for vocabulary-sized outputs):

- ``softmax``: an affine map d_model → vocabulary (W [d, V], b [V]) per (layer, τ);
- ``topk``: the same onto the K most frequent training tokens plus one "other" class;
- ``lens``: an affine map d_model → d_model initialised at the identity, then the model's frozen final
  LayerNorm and unembedding (tuned-lens style); untrained, it is the logit lens.

Examples are positions t < T − max(τ) of whole sequences (so every τ has a target); sequences are split into
train / validation / test, never positions of one sequence. Training minimises the summed cross-entropy of
all probes, reading the residuals chunk by chunk (all layers of a block of sequences at once); early stopping
keeps, for each (layer, τ), the parameters of its best validation epoch.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.functional import cross_entropy
from tqdm.auto import tqdm

from models.errors import ForethoughtError
from probes.fit import split_sequences
from probes.metrics import mean_scores

KINDS = ("softmax", "topk", "lens")
METRICS = ("top1", "top5", "cross_entropy")


class Residuals(Protocol):
    """Where residuals come from: a :class:`probes.cache.ResidualCache` (disk),
    :class:`probes.residuals.StreamingResiduals` (the model's forward passes) or :class:`InMemoryResiduals`."""

    tokens: np.ndarray  # [n_sequences, seq]
    d_model: int

    def read(self, sequences: np.ndarray, layers: Sequence[int]) -> np.ndarray: ...  # [layers, len(seqs), seq, d]


@dataclass
class InMemoryResiduals:
    """Residual arrays held in memory: tokens [n, seq] and {layer: [n, seq, d_model]}."""

    tokens: np.ndarray
    arrays: dict[int, np.ndarray]

    @property
    def d_model(self) -> int:
        return next(iter(self.arrays.values())).shape[-1]

    def read(self, sequences: np.ndarray, layers: Sequence[int]) -> np.ndarray:
        return np.stack([self.arrays[layer][sequences] for layer in layers])


@dataclass
class FutureProbeConfig:
    """How the probes are fitted."""

    kind: str = "softmax"  # softmax, topk or lens
    top_k: int = 1000  # topk: classes = the K most frequent training tokens + "other"
    lr: float = 1e-2
    weight_decay: float = 0.0
    batch_sequences: int = 64  # sequences per minibatch (all their probed positions)
    max_epochs: int = 20
    patience: int = 2  # stop after this many epochs without a better validation loss for any probe
    test_fraction: float = 0.2  # held-out sequences for the metrics
    validation_fraction: float = 0.1  # of the rest, for early stopping
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ForethoughtError(f"unknown probe kind {self.kind!r}; choose one of {', '.join(KINDS)}")


class FutureTokenProbes(nn.Module):
    """One affine probe per (layer index i, τ index j), stored stacked: weight [I, J, d_in, n_out]."""

    def __init__(self, n_layers: int, n_taus: int, d_model: int, n_classes: int, kind: str,
                 unembed: tuple[nn.Module, nn.Module] | None = None):
        super().__init__()
        self.kind = kind
        if kind == "lens":
            if unembed is None:
                raise ForethoughtError("lens probes need the model's final LayerNorm and unembedding")
            identity = torch.eye(d_model).expand(n_layers, n_taus, d_model, d_model)
            self.weight = nn.Parameter(identity.clone())
            self.bias = nn.Parameter(torch.zeros(n_layers, n_taus, d_model))
            self.final_norm, self.unembed = unembed
            for parameter in [*self.final_norm.parameters(), *self.unembed.parameters()]:
                parameter.requires_grad_(False)
        else:
            self.weight = nn.Parameter(torch.zeros(n_layers, n_taus, d_model, n_classes))
            self.bias = nn.Parameter(torch.zeros(n_layers, n_taus, n_classes))

    def logits(self, i: int, j: int, features: torch.Tensor) -> torch.Tensor:
        """features [batch, d_model] of layer index i → logits [batch, classes] of the τ-index-j probe."""
        mapped = torch.addmm(self.bias[i, j], features, self.weight[i, j])
        return self.unembed(self.final_norm(mapped)) if self.kind == "lens" else mapped


@dataclass
class FittedProbes:
    """The fitted grid and what it needs to score new data."""

    probes: FutureTokenProbes
    layers: list[int]
    taus: list[int]
    classes: np.ndarray | None  # topk: the K token ids; None: classes are token ids
    history: list[dict[str, float]]  # per epoch: mean validation loss over probes


def fit_future_probes(
    residuals: Residuals,
    layers: Sequence[int],
    taus: Sequence[int],
    config: FutureProbeConfig,
    vocab_size: int,
    unembed: tuple[nn.Module, nn.Module] | None = None,
    progress: bool = False,
) -> tuple[FittedProbes, ProbeScores]:
    """Fit every (layer, τ) probe on training sequences; return it and its held-out scores (``.table()``:
    tidy rows layer, tau, probe, metric ∈ top1, top5, cross_entropy, split "test", value, CI, n)."""
    layers, taus = list(layers), sorted(set(taus))
    tokens = np.asarray(residuals.tokens)
    n_sequences, seq_len = tokens.shape
    if not taus or min(taus) < 1 or max(taus) >= seq_len:
        raise ForethoughtError(f"τ must lie in 1 … {seq_len - 1} for sequences of {seq_len} tokens, got {taus}")
    train, test = split_sequences(n_sequences, config.test_fraction, seed=config.seed)
    n_validation = max(1, round(len(train) * config.validation_fraction))
    shuffled = np.random.default_rng(config.seed).permutation(train)
    validation, fit_part = np.sort(shuffled[:n_validation]), np.sort(shuffled[n_validation:])
    classes = top_classes(tokens[train], config.top_k) if config.kind == "topk" else None
    n_classes = config.top_k + 1 if classes is not None else vocab_size
    d_model = residuals.d_model
    device = torch.device(config.device)
    probes = FutureTokenProbes(len(layers), len(taus), d_model, n_classes, config.kind, unembed).to(device)
    optimizer = torch.optim.AdamW([probes.weight, probes.bias], lr=config.lr, weight_decay=config.weight_decay)
    batches = _Batches(residuals, layers, taus, classes, device)
    generator = np.random.default_rng(config.seed)
    best = torch.full((len(layers), len(taus)), float("inf"))
    best_state = (probes.weight.detach().clone(), probes.bias.detach().clone())
    history, stale = [], 0
    for epoch in tqdm(range(config.max_epochs), desc="probes", disable=not progress, leave=False):
        order = generator.permutation(fit_part)
        for start in range(0, len(order), config.batch_sequences):
            features, targets = batches(np.sort(order[start : start + config.batch_sequences]))
            for i in range(len(layers)):  # one pair at a time: a [batch, vocabulary] logit block each
                for j in range(len(taus)):
                    cross_entropy(probes.logits(i, j, features[i]), targets[j]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses = _validation_losses(probes, batches, validation, config.batch_sequences)  # [I, J]
        improved = losses < best
        best = torch.where(improved, losses, best)
        with torch.no_grad():
            best_state[0][improved] = probes.weight[improved]
            best_state[1][improved] = probes.bias[improved]
        history.append({"epoch": epoch + 1, "validation_loss": float(losses.mean())})
        stale = 0 if improved.any() else stale + 1
        if stale >= config.patience:
            break
    with torch.no_grad():
        probes.weight.copy_(best_state[0])
        probes.bias.copy_(best_state[1])
    fitted = FittedProbes(probes, layers, taus, classes, history)
    return fitted, score_future_probes(fitted, residuals, test, config.batch_sequences)


def top_classes(tokens: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` most frequent token ids of ``tokens`` (the topk probes' classes; ties: smaller id)."""
    counts = np.bincount(tokens.ravel())
    return np.argsort(-counts, kind="stable")[:k]


class _Batches:
    """Reads the residuals of a block of sequences: features [I, n_examples, d], targets [J, n_examples]."""

    def __init__(self, residuals: Residuals, layers: list[int], taus: list[int], classes, device):
        self.residuals, self.layers, self.taus, self.device = residuals, layers, taus, device
        self.tokens = np.asarray(residuals.tokens)
        self.positions = self.tokens.shape[1] - max(taus)  # t = 0 … T − max τ − 1
        self.lookup = None
        if classes is not None:  # token id → class index, "other" = K (classes are ids seen in the tokens)
            self.lookup = np.full(self.tokens.max() + 1, len(classes))
            self.lookup[classes] = np.arange(len(classes))

    def __call__(self, sequences: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.residuals.read(sequences, self.layers)[:, :, : self.positions]  # [I, b, positions, d]
        features = torch.from_numpy(features.astype(np.float32)).flatten(1, 2).to(self.device)  # [I, n, d]
        targets = np.stack([self.tokens[sequences, tau : tau + self.positions] for tau in self.taus])
        if self.lookup is not None:
            targets = self.lookup[targets]
        return features, torch.from_numpy(targets.reshape(len(self.taus), -1)).to(self.device)  # [J, n]

    def sequence_ids(self, sequences: np.ndarray) -> np.ndarray:
        return np.repeat(sequences, self.positions)


@torch.no_grad()
def _validation_losses(probes: FutureTokenProbes, batches: _Batches, sequences: np.ndarray,
                       batch_sequences: int) -> torch.Tensor:
    """Mean cross-entropy per (layer, τ) probe on ``sequences`` [I, J]."""
    n_layers, n_taus = probes.weight.shape[:2]
    total, count = torch.zeros(n_layers, n_taus), 0
    for start in range(0, len(sequences), batch_sequences):
        features, targets = batches(sequences[start : start + batch_sequences])
        for i in range(n_layers):
            for j in range(n_taus):
                total[i, j] += cross_entropy(probes.logits(i, j, features[i]), targets[j], reduction="sum").cpu()
        count += targets.shape[1]
    return total / count


@dataclass
class ProbeScores:
    """Per-example held-out scores of every probe: values[(layer, τ)] [n, 3] = (top-1 hit, top-5 hit,
    cross-entropy), all probes on the same examples, which come from the sequences in ``sequence_ids``."""

    kind: str
    values: dict[tuple[int, int], np.ndarray]
    sequence_ids: np.ndarray

    def table(self) -> pd.DataFrame:
        """Tidy rows: layer, tau, probe, metric ∈ top1, top5, cross_entropy, split "test", value, CI, n."""
        rows = []
        for (layer, tau), values in self.values.items():
            for metric, estimate in zip(METRICS, mean_scores(values, self.sequence_ids)):
                rows.append({"layer": layer, "tau": tau, "probe": self.kind, "metric": metric, "split": "test",
                             **estimate.columns()})
        return pd.DataFrame(rows)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.values})

    @property
    def taus(self) -> list[int]:
        return sorted({tau for _, tau in self.values})

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (.npz) atomically: a crash leaves the old file or none, never half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(path.name + ".tmp.npz")
        np.savez(staging, kind=self.kind, keys=np.array(list(self.values)).reshape(-1, 2),
                 values=np.stack(list(self.values.values())), sequence_ids=self.sequence_ids)
        os.replace(staging, path)

    @classmethod
    def load(cls, path: str | Path) -> ProbeScores:
        """Read what :meth:`save` wrote; a damaged file is named."""
        try:
            with np.load(path) as stored:
                keys, values = stored["keys"], stored["values"]
                return cls(str(stored["kind"]), {(int(layer), int(tau)): value for (layer, tau), value in zip(keys, values)},
                           stored["sequence_ids"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise ForethoughtError(f"stored probe scores {path} are unreadable ({error}); remove the file") from None

    def minus(self, other: ProbeScores) -> pd.DataFrame:
        """Paired differences self − other per (layer, τ, metric) on the same examples, 95 % bootstrap
        intervals resampling the same sequences for both (e.g. the pre-caching estimate P = vanilla − myopic)."""
        if not np.array_equal(self.sequence_ids, other.sequence_ids) or self.values.keys() != other.values.keys():
            raise ForethoughtError("paired differences need both probe grids scored on the same examples")
        return ProbeScores(self.kind, {key: self.values[key] - other.values[key] for key in self.values},
                           self.sequence_ids).table()


@torch.no_grad()
def score_future_probes(fitted: FittedProbes, residuals: Residuals, sequences: np.ndarray,
                        batch_sequences: int = 64) -> ProbeScores:
    """Top-1, top-5 and cross-entropy of every probe on each held-out example of ``sequences``."""
    probes = fitted.probes
    batches = _Batches(residuals, fitted.layers, fitted.taus, fitted.classes, probes.weight.device)
    chunks: dict[tuple[int, int], list[np.ndarray]] = {}
    for start in range(0, len(sequences), batch_sequences):
        features, targets = batches(sequences[start : start + batch_sequences])
        for i, layer in enumerate(fitted.layers):
            for j, tau in enumerate(fitted.taus):
                log_probs = probes.logits(i, j, features[i]).log_softmax(-1)
                top5 = log_probs.topk(min(5, log_probs.shape[-1]), dim=-1).indices
                hits = top5 == targets[j][:, None]
                values = torch.stack([hits[:, 0].double(), hits.any(-1).double(),
                                      -log_probs.gather(-1, targets[j][:, None])[:, 0].double()], dim=1)
                chunks.setdefault((layer, tau), []).append(values.cpu().numpy())
    values = {key: np.concatenate(parts) for key, parts in chunks.items()}
    return ProbeScores(probes.kind, values, batches.sequence_ids(sequences))  # ids: the chunks above, in order
