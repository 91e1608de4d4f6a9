"""Future-token probes: predict x[t+τ] from h[l, t], every (layer, τ) of a checkpoint fitted in one pass.

Kinds (torch, minibatches, for vocabulary-sized outputs):

- ``softmax``: an affine map d_model → vocabulary (W [d, V], b [V]) per (layer, τ);
- ``topk``: the same onto the K most frequent training tokens plus one "other" class;
- ``lens``: an affine map d_model → d_model initialised at the identity, then the model's frozen final
  LayerNorm and unembedding (tuned-lens style); untrained, it is the logit lens.

``softmax`` and ``topk`` probes read standardised features ((h − mean) / std per dimension, from the training
sequences: still an affine map of h) and start from W = 0 with the bias at the log frequencies of the training
targets, i.e. at the unigram baseline. Both matter for real models: a Llama's residual stream has a few
"massive" dimensions (SmolLM2: standard deviations up to ~3,000 against a median of ~10), which make an
unstandardised probe ill-conditioned, and Adam moves a zero bias by only ~lr a step.

Examples are positions t < T − max(τ) (or a given horizon) of whole sequences (so every τ has a target); sequences
are split into train / validation / test, never positions of one sequence (:mod:`probes.split`). Training
minimises the summed cross-entropy of all probes, reading the residuals chunk by chunk (all layers of a block of
sequences at once); early stopping keeps, for each (layer, τ), the parameters of its best validation epoch.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import safetensors
import safetensors.torch
import torch
from torch import nn
from torch.nn.functional import cross_entropy, gelu

from forethought.core.errors import ForethoughtError
from forethought.core.files import atomic_write_bytes
from forethought.core.offsets import at_offset
from forethought.core.precision import autocast, check_precision
from forethought.core.progress import progress_bar
from forethought.core.settings import NON_NEGATIVE, check_settings
from forethought.probes.baselines import BaselineScores
from forethought.probes.metrics import mean_scores, text_groups
from forethought.probes.split import ProbeSplit

KINDS = ("softmax", "topk", "lens", "mlp")
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

    kind: str = "softmax"  # softmax, topk, lens or mlp (topk's classes through one hidden layer)
    top_k: int = 1000  # topk, mlp: classes = the K most frequent training tokens + "other"
    hidden: int = 256  # mlp: width of the hidden layer (GELU)
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_sequences: int = 64  # sequences per minibatch (all their probed positions)
    max_epochs: int = 20
    patience: int = 2  # stop after this many epochs without a better validation loss for any probe
    test_fraction: float = 0.2  # held-out sequences for the metrics
    validation_fraction: float = 0.1  # of the rest, for early stopping
    seed: int = 0
    device: str = "cpu"
    precision: str = "float32"  # or bfloat16: the probes' matrix products under autocast (float32 weights)
    horizon: int | None = None  # examples are positions t < T − horizon (default: max τ); a larger horizon scores
    # probes of fewer τ on the examples of a larger grid (the logit lens, τ = 1, beside probes up to τ = 4)
    in_topk_classes: bool = False  # lens only: score it in the topk probes' classes (the top_k most frequent
    # training tokens + "other", whose logit is the log-sum-exp of the other tokens'), to be drawn beside them

    def __post_init__(self):
        check_settings(self, {"max_epochs": NON_NEGATIVE})  # 0: untrained (the logit lens)
        if self.kind not in KINDS:
            raise ForethoughtError(f"unknown probe kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        check_precision(self.precision)

    @property
    def in_topk(self) -> bool:
        """Whether the probes predict the top-K classes (K most frequent training tokens + "other")."""
        return self.kind in ("topk", "mlp") or (self.kind == "lens" and self.in_topk_classes)

    def split(self, tokens: np.ndarray, clusters: np.ndarray | None = None) -> ProbeSplit:
        """The split of ``tokens`` [n, T] (by their ``clusters`` [n], if given) these probes are fitted and scored
        on, with their classes."""
        return ProbeSplit.of(tokens, self.test_fraction, self.validation_fraction, self.seed,
                             self.top_k if self.in_topk else None, clusters)


class FutureTokenProbes(nn.Module):
    """One affine probe per (layer index i, τ index j); layer i's are stacked in ``weights[i]`` [J, d_in, n_out]
    and ``biases[i]`` [J, n_out] (one tensor a layer, so a layer's backward touches only its own). An ``mlp`` probe
    reads GELU(h · hidden_weights[i][j] + hidden_biases[i][j]) [batch, hidden] instead of h: one hidden layer, like
    the "necks" of Wu et al.'s probes, so that what a linear probe misses is measured."""

    def __init__(self, n_layers: int, n_taus: int, d_model: int, n_classes: int, kind: str,
                 unembed: tuple[nn.Module, nn.Module] | None = None, lens_classes: np.ndarray | None = None,
                 hidden: int = 0, seed: int = 0):
        super().__init__()
        self.kind = kind
        d_in = hidden if kind == "mlp" else d_model
        generator = torch.Generator().manual_seed(seed)  # the hidden layers' starting weights (He-scaled)
        self.hidden_weights = nn.ParameterList(
            [torch.randn(n_taus, d_model, hidden, generator=generator) * (2 / d_model) ** 0.5
             for _ in range(n_layers)] if kind == "mlp" else [])
        self.hidden_biases = nn.ParameterList([torch.zeros(n_taus, hidden) for _ in range(n_layers)]
                                              if kind == "mlp" else [])
        # lens in the topk classes: the K token ids whose logits are kept ("other": the log-sum-exp of the rest)
        self.register_buffer("lens_classes", None if lens_classes is None else torch.as_tensor(lens_classes))
        if kind == "lens":
            if unembed is None:
                raise ForethoughtError("lens probes need the model's final LayerNorm and unembedding")
            self.weights = nn.ParameterList([torch.eye(d_model).repeat(n_taus, 1, 1) for _ in range(n_layers)])
            self.biases = nn.ParameterList([torch.zeros(n_taus, d_model) for _ in range(n_layers)])
            # frozen copies: the model being read keeps its own parameters (and their requires_grad) as they were
            self.final_norm, self.unembed = (copy.deepcopy(module) for module in unembed)
            for parameter in [*self.final_norm.parameters(), *self.unembed.parameters()]:
                parameter.requires_grad_(False)
            self._readouts: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}  # see _readout
        else:
            self.weights = nn.ParameterList([torch.zeros(n_taus, d_in, n_classes) for _ in range(n_layers)])
            self.biases = nn.ParameterList([torch.zeros(n_taus, n_classes) for _ in range(n_layers)])
        # features are standardised as (h − feature_mean[i]) · feature_scale[i]; the lens reads h as it is
        self.register_buffer("feature_mean", torch.zeros(n_layers, d_model))
        self.register_buffer("feature_scale", torch.ones(n_layers, d_model))

    @property
    def shape(self) -> tuple[int, int]:
        """(number of layers, number of τ)."""
        return len(self.weights), self.weights[0].shape[0]

    def layer_parameters(self, i: int) -> list[nn.Parameter]:
        """Layer index i's trained parameters, each [J, …] (indexed by τ first)."""
        hidden = [self.hidden_weights[i], self.hidden_biases[i]] if self.kind == "mlp" else []
        return [self.weights[i], self.biases[i], *hidden]

    def logits(self, i: int, j: int, features: torch.Tensor) -> torch.Tensor:
        """features [batch, d_model] of layer index i → logits [batch, classes] of the τ-index-j probe."""
        features = self._standardised(i, features)
        if self.kind == "mlp":
            features = gelu(torch.addmm(self.hidden_biases[i][j], features, self.hidden_weights[i][j]))
        return self._read(torch.addmm(self.biases[i][j], features, self.weights[i][j]))

    def layer_logits(self, i: int, features: torch.Tensor) -> Iterator[torch.Tensor]:
        """features [batch, d_model] of layer index i → the logits [batch, classes] of each τ's probe, in order,
        one at a time. The layer's stacked parameters are unbound once (a backward through ``weights[i][j]`` for
        each j would build a zero tensor of all J probes' size per τ), and the features standardised once."""
        features = self._standardised(i, features)
        hidden = (zip(self.hidden_weights[i].unbind(0), self.hidden_biases[i].unbind(0)) if self.kind == "mlp"
                  else [None] * len(self.weights[i]))
        for (weight, bias), layer in zip(zip(self.weights[i].unbind(0), self.biases[i].unbind(0)), hidden):
            read = features if layer is None else gelu(torch.addmm(layer[1], features, layer[0]))
            yield self._read(torch.addmm(bias, read, weight))

    def _standardised(self, i: int, features: torch.Tensor) -> torch.Tensor:
        """The features a probe of layer index i reads: standardised, except by a lens (it reads h as it is)."""
        return features if self.kind == "lens" else (features - self.feature_mean[i]) * self.feature_scale[i]

    def _read(self, mapped: torch.Tensor) -> torch.Tensor:
        """A probe's affine map [batch, n_out] → its logits: the map itself, or (lens) through the final norm and
        the unembedding — over the vocabulary, or in the top-K classes with "other" = the rest's log-sum-exp."""
        if self.kind != "lens":
            return mapped
        normed = self.final_norm(mapped)  # [batch, d_model]
        if self.lens_classes is None:
            return _linear(normed, *self._readout("vocabulary"))  # [batch, vocab]
        kept = _linear(normed, *self._readout("kept"))  # [batch, K]
        rest = torch.cat([_linear(rows, *self._readout("rest")).logsumexp(1, keepdim=True)
                          for rows in normed.split(_LENS_ROWS)])  # [batch, 1]
        return torch.cat([kept, rest], dim=1)  # [batch, K + 1]

    def _readout(self, part: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unembedding's rows (and bias) of ``part`` — the whole vocabulary, the K kept classes or the rest —
        in the dtype autocast computes in here, made once per (part, device, dtype): a frozen weight is not a
        parameter, so autocast would otherwise cast all of it (SmolLM2: 28 M values) at every call."""
        weight = self.unembed.weight  # [vocab, d_model]
        dtype = (torch.get_autocast_dtype(weight.device.type) if torch.is_autocast_enabled(weight.device.type)
                 else weight.dtype)
        key = (part, weight.device, dtype)
        if key not in self._readouts:
            if part == "vocabulary":
                rows = slice(None)
            else:
                rows = self.lens_classes if part == "kept" else _complement(self.lens_classes, len(weight))
            bias = self.unembed.bias
            self._readouts[key] = (weight[rows].to(dtype), None if bias is None else bias[rows].to(dtype))
        return self._readouts[key]


_LENS_ROWS = 1024  # examples whose logits over the rest of the vocabulary are held at once (SmolLM2: ≤ 200 MB)


def _linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """inputs [n, d] · weight [m, d]ᵀ (+ bias [m]) → [n, m], in the weight's dtype."""
    return torch.nn.functional.linear(inputs.to(weight.dtype), weight, bias)


def _complement(indices: torch.Tensor, size: int) -> torch.Tensor:
    """The integers 0 … size − 1 not in ``indices``, ascending."""
    keep = torch.ones(size, dtype=torch.bool, device=indices.device)
    keep[indices] = False
    return keep.nonzero()[:, 0]


@dataclass
class FittedProbes:
    """The fitted grid and what it needs to score new data; :meth:`probe` holds one of its probes, :meth:`save`
    and :meth:`load` keep it on disk (safetensors)."""

    probes: FutureTokenProbes
    layers: list[int]
    taus: list[int]
    classes: np.ndarray | None  # topk: the K token ids; None: classes are token ids
    history: list[dict[str, float]]  # per epoch: mean validation loss over probes
    horizon: int  # examples are positions t < T − horizon

    def probe(self, layer: int, tau: int) -> Probe:
        """The fitted probe of x[t+τ] from h[layer, t]."""
        if layer not in self.layers or tau not in self.taus:
            raise ForethoughtError(f"no probe at layer {layer}, τ {tau}: fitted at layers "
                                   f"{', '.join(map(str, self.layers))} and τ {', '.join(map(str, self.taus))}")
        return Probe(self, layer, tau)

    def save(self, path: str | Path, made_from: str = "") -> None:
        """Write the grid to ``path`` (.safetensors) atomically: every weight and bias, the standardisation
        statistics, the classes, and (metadata) kind, layers, τ, horizon, history, ``made_from`` and a digest of
        the tensors (checked by :meth:`load`). A lens's frozen readout is the model's own and is not stored."""
        tensors = {"feature_mean": self.probes.feature_mean, "feature_scale": self.probes.feature_scale}
        for i, (weight, bias) in enumerate(zip(self.probes.weights, self.probes.biases)):
            tensors[f"weights.{i}"], tensors[f"biases.{i}"] = weight.detach(), bias.detach()
        for i, (weight, bias) in enumerate(zip(self.probes.hidden_weights, self.probes.hidden_biases)):
            tensors[f"hidden_weights.{i}"], tensors[f"hidden_biases.{i}"] = weight.detach(), bias.detach()
        if self.classes is not None:
            tensors["classes"] = torch.as_tensor(self.classes, dtype=torch.int64)
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        metadata = {"kind": self.probes.kind, "layers": json.dumps(self.layers), "taus": json.dumps(self.taus),
                    "horizon": str(self.horizon), "history": json.dumps(self.history), "made_from": made_from,
                    "n_classes": str(self.probes.weights[0].shape[-1]), "tensors_digest": _tensors_digest(tensors),
                    "hidden": str(self.probes.hidden_weights[0].shape[-1] if self.probes.kind == "mlp" else 0)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(path), safetensors.torch.save(tensors, metadata))

    @classmethod
    def load(cls, path: str | Path, made_from: str | None = None,
             unembed: tuple[nn.Module, nn.Module] | None = None) -> FittedProbes:
        """Read what :meth:`save` wrote (a lens needs its model's ``unembed``). A damaged file, or one made from
        anything else than ``made_from`` (when given), is refused, naming the file."""
        try:
            with safetensors.safe_open(str(path), framework="pt") as stored:
                metadata = stored.metadata() or {}
                tensors = {name: stored.get_tensor(name) for name in stored.keys()}
            layers, taus = json.loads(metadata["layers"]), json.loads(metadata["taus"])
            kind, horizon, history = metadata["kind"], int(metadata["horizon"]), json.loads(metadata["history"])
            damaged = metadata["tensors_digest"] != _tensors_digest(tensors)
        except (OSError, ValueError, KeyError, RuntimeError, safetensors.SafetensorError) as error:
            raise ForethoughtError(f"stored probes {path} are unreadable ({error}); remove the file") from None
        if damaged:
            raise ForethoughtError(f"stored probes {path} are damaged (their digest differs); remove the file")
        if made_from is not None and metadata.get("made_from") != made_from:
            raise ForethoughtError(f"stored probes {path} were made from other residuals or settings; remove the file")
        classes = tensors["classes"].numpy() if "classes" in tensors else None
        d_model = tensors["feature_mean"].shape[1]
        probes = FutureTokenProbes(len(layers), len(taus), d_model, int(metadata["n_classes"]), kind, unembed,
                                   classes if kind == "lens" else None, int(metadata.get("hidden", 0)))
        probes.load_state_dict({**probes.state_dict(), **{name: tensor for name, tensor in tensors.items()
                                                          if name != "classes"}})
        return cls(probes.eval(), layers, taus, classes, history, horizon)


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """BLAKE2b of the tensors' names, dtypes, shapes and bytes (safetensors itself has no checksum)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class Probe:
    """One fitted probe of x[t+τ] from h[layer, t], held: its affine map in residual space (un-standardised:
    ``logits = h · weight + bias``), its classes, its predictions and its main directions."""

    grid: FittedProbes
    layer: int
    tau: int

    @property
    def kind(self) -> str:
        return self.grid.probes.kind

    @property
    def _index(self) -> tuple[int, int]:
        return self.grid.layers.index(self.layer), self.grid.taus.index(self.tau)

    @property
    def weight(self) -> torch.Tensor:
        """[d_model, n_classes] (a lens: [d_model, d_model], the map into its model's final norm), on raw h."""
        self._check_affine()
        i, j = self._index
        weight = self.grid.probes.weights[i][j].detach()
        return weight if self.kind == "lens" else self.grid.probes.feature_scale[i][:, None] * weight

    @property
    def bias(self) -> torch.Tensor:
        """[n_classes] (a lens: [d_model]), on raw h: the standardisation folded in."""
        self._check_affine()
        i, j = self._index
        probes = self.grid.probes
        bias = probes.biases[i][j].detach()
        if self.kind == "lens":
            return bias
        return bias - (probes.feature_mean[i] * probes.feature_scale[i]) @ probes.weights[i][j].detach()

    def _check_affine(self) -> None:
        if self.kind == "mlp":
            raise ForethoughtError("an mlp probe is not affine: it has no single weight or bias (use predict)")

    @property
    def classes(self) -> np.ndarray:
        """The token id of each class, in order; −1 for topk's last class, "other" (any other token)."""
        if self.grid.classes is None:
            return np.arange(self.grid.probes.weights[0].shape[-1] if self.kind != "lens"
                             else self.grid.probes.unembed.weight.shape[0])
        other = [-1] if self.kind in ("topk", "mlp") or self.grid.probes.lens_classes is not None else []
        return np.concatenate([np.asarray(self.grid.classes), other]).astype(np.int64)

    @torch.no_grad()
    def predict(self, h: torch.Tensor | np.ndarray) -> torch.Tensor:
        """h [..., d_model] (raw residuals of this layer) → logits [..., n_classes] over :attr:`classes`."""
        if isinstance(h, np.ndarray) and not h.flags.writeable:
            h = h.copy()  # a read-only array (a cache's memory map) cannot back a tensor
        h = torch.as_tensor(h, dtype=torch.float32, device=self.grid.probes.feature_mean.device)
        i, j = self._index
        return self.grid.probes.logits(i, j, h.reshape(-1, h.shape[-1])).reshape(*h.shape[:-1], -1)

    def directions(self, k: int) -> torch.Tensor:
        """The top-``k`` directions in residual space [k, d_model], orthonormal: the left singular vectors of the
        weight on raw h with each class's weight taken relative to the classes' mean (adding one vector to every
        class's weight changes no prediction), strongest first."""
        if self.kind == "lens":
            raise ForethoughtError("a lens probe's directions pass through its model's final norm: read weight")
        weight = self.weight.double()
        u, _, _ = torch.linalg.svd(weight - weight.mean(1, keepdim=True), full_matrices=False)
        if not 1 <= k <= u.shape[1]:
            raise ForethoughtError(f"k must lie in 1 … {u.shape[1]}, got {k}")
        return u[:, :k].T.float()


def fit_future_probes(
    residuals: Residuals,
    layers: Sequence[int],
    taus: Sequence[int],
    config: FutureProbeConfig,
    vocab_size: int,
    unembed: tuple[nn.Module, nn.Module] | None = None,
    progress: bool = False,
    split: ProbeSplit | None = None,
) -> tuple[FittedProbes, ProbeScores]:
    """Fit every (layer, τ) probe on training sequences; return it and its held-out scores (``.table()``:
    tidy rows layer, tau, probe, metric ∈ top1, top5, cross_entropy, split "test", value, CI, n).
    ``split``: the sequences and classes (default: ``config.split(tokens)``), e.g. the one the count baselines
    are scored on."""
    layers, taus = list(layers), sorted(set(taus))
    tokens = np.asarray(residuals.tokens)
    n_sequences, seq_len = tokens.shape
    if not taus or min(taus) < 1 or max(taus) >= seq_len:
        raise ForethoughtError(f"τ must lie in 1 … {seq_len - 1} for sequences of {seq_len} tokens, got {taus}")
    horizon = max(taus) if config.horizon is None else config.horizon
    if not max(taus) <= horizon < seq_len:
        raise ForethoughtError(f"the horizon must lie in {max(taus)} … {seq_len - 1}, got {horizon}")
    split = config.split(tokens) if split is None else split
    if max(split.train.max(), split.test.max()) >= n_sequences:
        raise ForethoughtError(f"the split names sequences beyond the {n_sequences} probed")
    if (split.classes is not None) != config.in_topk:
        raise ForethoughtError(f"the split's classes do not fit {config.kind} probes "
                               f"({'top-K classes' if config.in_topk else 'every token'} expected)")
    validation, fit_part, classes = split.validation, split.fit, split.classes
    n_classes = len(classes) + 1 if classes is not None else vocab_size
    d_model = residuals.d_model
    device = torch.device(config.device)
    probes = FutureTokenProbes(len(layers), len(taus), d_model, n_classes, config.kind, unembed,
                               classes if config.kind == "lens" else None, config.hidden, config.seed).to(device)
    batches = _Batches(residuals, layers, taus, classes, device, horizon)
    generator = np.random.default_rng(config.seed)
    if config.kind != "lens":
        sample = np.sort(generator.permutation(fit_part)[:_STATISTICS_SEQUENCES])
        probes.feature_mean[:], probes.feature_scale[:] = _feature_statistics(batches, sample, config.batch_sequences)
        prior = _log_frequencies(batches.targets(fit_part), n_classes).to(device)  # [J, classes], every layer
        with torch.no_grad():
            for bias in probes.biases:
                bias.copy_(prior)
    optimizer = torch.optim.AdamW(probes.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best = torch.full((len(layers), len(taus)), float("inf"))
    # per layer, its parameters [J, …] as they were at each τ's best epoch
    best_parameters = [[p.detach().clone() for p in probes.layer_parameters(i)] for i in range(len(layers))]
    history, stale = [], 0
    for epoch in progress_bar(range(config.max_epochs), desc="probes", disable=not progress, leave=False):
        order = generator.permutation(fit_part)
        for start in range(0, len(order), config.batch_sequences):
            features, targets = batches(np.sort(order[start : start + config.batch_sequences]))
            for i in range(len(layers)):  # a layer at a time: J [batch, classes] logit blocks
                with autocast(device, config.precision):
                    logits = list(probes.layer_logits(i, features[i]))  # computed here, under autocast
                # outside autocast, so bfloat16 logits keep a bfloat16 softmax (float32: 1.6× the step's time)
                sum(cross_entropy(block, target) for block, target in zip(logits, targets)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with autocast(device, config.precision):
            losses = _validation_losses(probes, batches, validation, config.batch_sequences)  # [I, J]
        improved = losses < best
        best = torch.where(improved, losses, best)
        with torch.no_grad():
            for i in range(len(layers)):
                for best_parameter, parameter in zip(best_parameters[i], probes.layer_parameters(i)):
                    best_parameter[improved[i]] = parameter[improved[i]]
        history.append({"epoch": epoch + 1, "validation_loss": float(losses.mean())})
        stale = 0 if improved.any() else stale + 1
        if stale >= config.patience:
            break
    with torch.no_grad():
        for i in range(len(layers)):
            for best_parameter, parameter in zip(best_parameters[i], probes.layer_parameters(i)):
                parameter.copy_(best_parameter)
    fitted = FittedProbes(probes, layers, taus, classes, history, horizon)
    with autocast(device, config.precision):
        return fitted, score_future_probes(fitted, residuals, split.test, config.batch_sequences)


_STATISTICS_SEQUENCES = 256  # training sequences the feature means and standard deviations are estimated from


@torch.no_grad()
def _feature_statistics(
    batches: _Batches, sequences: np.ndarray, batch_sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the mean and 1 / standard deviation of every feature over ``sequences``' examples: [I, d] each."""
    total, squares, count = 0.0, 0.0, 0
    for start in range(0, len(sequences), batch_sequences):
        features = batches(sequences[start : start + batch_sequences])[0].double()  # [I, n, d]
        total, squares = total + features.sum(1), squares + features.pow(2).sum(1)
        count += features.shape[1]
    mean = total / count
    variance = (squares / count - mean.pow(2)).clamp(min=0)
    floor = 1e-6 * variance.mean(1, keepdim=True) + 1e-12  # constant features stay finite
    return mean.float(), (variance + floor).rsqrt().float()


def _log_frequencies(targets: np.ndarray, n_classes: int) -> torch.Tensor:
    """targets [J, n] → log of each class's add-one frequency per τ [J, n_classes]: the unigram baseline."""
    counts = np.stack([np.bincount(row, minlength=n_classes) for row in targets]) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum(1, keepdims=True))).float()


class _Batches:
    """Reads the residuals of a block of sequences: features [I, n_examples, d], targets [J, n_examples]."""

    def __init__(self, residuals: Residuals, layers: list[int], taus: list[int], classes, device, horizon: int):
        self.residuals, self.layers, self.taus, self.device = residuals, layers, taus, device
        self.tokens = np.asarray(residuals.tokens)
        self.positions = self.tokens.shape[1] - horizon  # t = 0 … T − horizon − 1
        self.lookup = None
        if classes is not None:  # token id → class index, "other" = K (classes are ids seen in the tokens)
            self.lookup = np.full(self.tokens.max() + 1, len(classes))
            self.lookup[classes] = np.arange(len(classes))

    def __call__(self, sequences: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.residuals.read(sequences, self.layers)[:, :, : self.positions]  # [I, b, positions, d]
        # torch converts float16 → float32 vectorised (numpy's astype: ~10× slower, 10 % of a SmolLM2 grid's fit)
        features = torch.from_numpy(features).to(self.device, torch.float32).flatten(1, 2)  # [I, n, d]
        return features, torch.from_numpy(self.targets(sequences)).to(self.device)

    def targets(self, sequences: np.ndarray) -> np.ndarray:
        """The class of x[t+τ] at every example of ``sequences``: [J, n]."""
        targets = np.stack([at_offset(self.tokens[sequences], tau, self.positions) for tau in self.taus])
        if self.lookup is not None:
            targets = self.lookup[targets]
        return targets.reshape(len(self.taus), -1)

    def sequence_ids(self, sequences: np.ndarray) -> np.ndarray:
        return np.repeat(sequences, self.positions)


@torch.no_grad()
def _validation_losses(probes: FutureTokenProbes, batches: _Batches, sequences: np.ndarray,
                       batch_sequences: int) -> torch.Tensor:
    """Mean cross-entropy per (layer, τ) probe on ``sequences`` [I, J]."""
    n_layers, n_taus = probes.shape
    total, count = torch.zeros(n_layers, n_taus), 0
    for start in range(0, len(sequences), batch_sequences):
        features, targets = batches(sequences[start : start + batch_sequences])
        for i in range(n_layers):
            for j, logits in enumerate(probes.layer_logits(i, features[i])):
                total[i, j] += cross_entropy(logits.float(), targets[j], reduction="sum").cpu()
        count += targets.shape[1]
    return total / count


@dataclass
class ProbeScores:
    """Per-example held-out scores of every probe: values[(layer, τ)] [n, 3] = (top-1 hit, top-5 hit,
    cross-entropy), all probes on the same examples, which come from the sequences in ``sequence_ids``."""

    kind: str
    values: dict[tuple[int, int], np.ndarray]
    sequence_ids: np.ndarray
    clusters: np.ndarray | None = None  # [n] each example's resampling unit (None: its sequence)
    texts: np.ndarray | None = None  # [n] each example's text (tables by text)

    def table(self, by_text: bool = False) -> pd.DataFrame:
        """Tidy rows: layer, tau, probe, metric ∈ top1, top5, cross_entropy, split "test", value, CI (resampling
        :attr:`clusters`), n; with ``by_text``, the same per text of a mixed sample (split "test: <text>")."""
        clusters = self.sequence_ids if self.clusters is None else self.clusters
        rows = []
        for split, where in text_groups(self.texts if by_text else None, len(clusters)):
            for (layer, tau), values in self.values.items():
                for metric, estimate in zip(METRICS, mean_scores(values[where], clusters[where])):
                    rows.append({"layer": layer, "tau": tau, "probe": self.kind, "metric": metric, "split": split,
                                 **estimate.columns()})
        return pd.DataFrame(rows, columns=["layer", "tau", "probe", "metric", "split", "value", "ci_low", "ci_high",
                                           "n"])

    def on(self, clusters: np.ndarray, texts: np.ndarray) -> ProbeScores:
        """These scores with the held-out sample's ``clusters`` and ``texts`` (both [n_sequences], indexed by
        sequence id) attached to each example: intervals then resample clusters, and tables can be had by text."""
        return replace(self, clusters=clusters[self.sequence_ids], texts=texts[self.sequence_ids])

    def with_values(self, values: dict[tuple[int, int], np.ndarray], kind: str | None = None) -> ProbeScores:
        """Other values on the same examples (same clusters and texts)."""
        return replace(self, kind=kind or self.kind, values=values)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.values})

    @property
    def taus(self) -> list[int]:
        return sorted({tau for _, tau in self.values})

    def save(self, path: str | Path, made_from: str = "") -> None:
        """Write to ``path`` (.npz) atomically: a crash leaves the old file or none, never half a file.
        ``made_from``: a digest of what the scores were computed from, checked by :meth:`load`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, kind=self.kind, keys=np.array(list(self.values)).reshape(-1, 2),
                 values=np.stack(list(self.values.values())), sequence_ids=self.sequence_ids, made_from=made_from)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path, made_from: str | None = None) -> ProbeScores:
        """Read what :meth:`save` wrote. A damaged file (the zip's CRC-32s are checked), or one made from
        anything else than ``made_from`` (when given), is refused, naming the file."""
        try:
            with np.load(path) as stored:
                keys, values = stored["keys"], stored["values"]
                scores = cls(
                    str(stored["kind"]),
                    {(int(layer), int(tau)): value for (layer, tau), value in zip(keys, values)},
                    stored["sequence_ids"],
                )
                stored_from = str(stored["made_from"]) if "made_from" in stored else ""
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise ForethoughtError(f"stored probe scores {path} are unreadable ({error}); remove the file") from None
        if made_from is not None and stored_from != made_from:
            raise ForethoughtError(
                f"stored probe scores {path} were made from other residuals or settings; remove the file"
            )
        return scores

    def minus(self, other: ProbeScores, by_text: bool = False) -> pd.DataFrame:
        """Paired differences self − other per (layer, τ, metric) on the same examples, 95 % bootstrap
        intervals resampling the same clusters for both (e.g. the pre-caching estimate P = vanilla − myopic)."""
        if not np.array_equal(self.sequence_ids, other.sequence_ids) or self.values.keys() != other.values.keys():
            raise ForethoughtError("paired differences need both probe grids scored on the same examples")
        return self.with_values({key: self.values[key] - other.values[key] for key in self.values}).table(by_text)

    def minus_baseline(self, baseline: BaselineScores, probe: str = "skip-bigram",
                       by_text: bool = False) -> pd.DataFrame:
        """Paired differences self − a count baseline per (layer, τ, metric), on the same examples, with 95 %
        bootstrap intervals resampling the same clusters for both: what the residual stream tells about x[t+τ]
        beyond the counts (the rows' probe is "<kind> − <baseline>")."""
        if not np.array_equal(self.sequence_ids, baseline.sequence_ids):
            raise ForethoughtError("paired differences need the probes and the baseline scored on the same examples")
        by_tau = baseline.values[probe]
        differences = {(layer, tau): values - by_tau[tau] for (layer, tau), values in self.values.items()}
        return self.with_values(differences, f"{self.kind} − {probe}").table(by_text)


@torch.no_grad()
def score_future_probes(fitted: FittedProbes, residuals: Residuals, sequences: np.ndarray,
                        batch_sequences: int = 64) -> ProbeScores:
    """Top-1, top-5 and cross-entropy of every probe on each held-out example of ``sequences``."""
    probes = fitted.probes
    batches = _Batches(residuals, fitted.layers, fitted.taus, fitted.classes, probes.weights[0].device,
                       fitted.horizon)
    chunks: dict[tuple[int, int], list[np.ndarray]] = {}
    for start in range(0, len(sequences), batch_sequences):
        features, targets = batches(sequences[start : start + batch_sequences])
        for i, layer in enumerate(fitted.layers):
            for j, (tau, logits) in enumerate(zip(fitted.taus, probes.layer_logits(i, features[i]))):  # [n, classes]
                hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == targets[j][:, None]
                logits = logits.float()  # cross-entropy = logsumexp − the target's logit, in float32
                losses = logits.logsumexp(-1) - logits.gather(-1, targets[j][:, None])[:, 0]
                values = torch.stack([hits[:, 0].double(), hits.any(-1).double(), losses.double()], dim=1)
                chunks.setdefault((layer, tau), []).append(values.cpu().numpy())
    values = {key: np.concatenate(parts) for key, parts in chunks.items()}
    return ProbeScores(probes.kind, values, batches.sequence_ids(sequences))  # ids: the chunks above, in order
