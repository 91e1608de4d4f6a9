"""The probing engine: named checkpoints, held as loaded objects, probed on the same held-out sequences.

:class:`Probing` computes lazily and once — each checkpoint's residual cache, its probe grids (scores and the
fitted probes you can hold), the logit lens, the count baselines — and gives them as tidy rows, paired
differences, held probes and token-level predictions. ``forethought probe`` and ``precache`` write its results
(:func:`probe_checkpoints`); :class:`analyses.compare.Comparison` adds the figures on top of it. A model it is
handed is never reloaded: the random-init control is an object too, and a residual cache is computed from the
objects (TransformerLens boots over a copy) only where it is not on disk already.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from forethought.analyses.experiment import check_out, prepare_out
from forethought.analyses.probing import (
    AT_PRIOR,
    BASELINE,
    LENS_TAUS,
    LOGIT_LENS,
    SKIP_BIGRAM,
    TOPK_KINDS,
    UNIGRAM,
    VALIDATION,
    ProbeSettings,
    best_by_tau,
    check_top_k,
)
from forethought.analyses.results import CONTROL, run_meta
from forethought.core.errors import ForethoughtError
from forethought.core.progress import progress_bar
from forethought.models.families import n_layers, non_embedding_parameters
from forethought.models.gpt2 import build_lm, quiet_loading
from forethought.models.heldout import HeldOutSample, heldout_data, heldout_sample
from forethought.models.lm import LMCheckpoint, check_same_tokenizer
from forethought.models.tasks.text import TextData, tokenization
from forethought.models.train import resolve_device
from forethought.probes.baselines import BaselineScores, count_baselines
from forethought.probes.cache import PROCESSING_MODE, ResidualCache, build_cache
from forethought.probes.future import KINDS, FutureProbeConfig, Probe, ProbeScores
from forethought.probes.split import ProbeSplit
from forethought.probes.store import fitted_probes, probe_scores, validation_scores

log = logging.getLogger(__name__)

FEW_DOCUMENTS = 20  # test documents below which a bootstrap over documents is too coarse to trust


class Probing:
    """Future-token probe results of named checkpoints on the same held-out sequences, computed when asked for.

    ``settings`` fix the held-out data and the (layer, τ) grid; the probe kind of each request may vary. Residual
    caches and probe stores live under ``folder`` (``caches/<name>``, ``scores/<name>``), so a probe run's
    folder is reused as it is. ``heldout`` is the held-out data and sample when the caller has drawn them already
    (with the same settings); otherwise they are drawn on first use.
    """

    def __init__(self, checkpoints: Mapping[str, LMCheckpoint], settings: ProbeSettings, folder: str | Path,
                 heldout: tuple[TextData, HeldOutSample] | None = None):
        if not checkpoints:
            raise ForethoughtError("probing needs at least one checkpoint")
        self.settings, self.folder = settings, Path(folder)
        self._checkpoints: dict[str, LMCheckpoint] = {}
        for name, checkpoint in checkpoints.items():
            self._admit(name, checkpoint)
        self._device = str(resolve_device(settings.device))
        self._caches: dict[str, ResidualCache] = {}
        self._scores: dict[tuple[str, str], ProbeScores] = {}  # (checkpoint, probe kind or LOGIT_LENS)
        self._rows: dict[tuple[str, str, bool | str], pd.DataFrame] = {}  # tidy rows (bootstrapped once)
        self._baselines: dict[str, BaselineScores] = {}  # per target
        self._splits: dict[tuple, ProbeSplit] = {}  # per class set (top-K or every token) and fractions
        self._heldout = heldout
        self._counted: np.ndarray | None | object = _UNREAD  # the count baselines' training tokens, once read
        self._losses: dict[str, np.ndarray] = {}  # checkpoint folder → per-token held-out losses, once measured
        self.seconds: dict[str, float] = {}  # wall time of each step run here, computed or read back

    def _admit(self, name: str, checkpoint: LMCheckpoint) -> None:
        """Check that ``checkpoint`` can be fed the same tokens, has the requested layers and — unless the
        settings name a ``corpus`` — was trained on the data the others were (or records none): the held-out
        documents are those none of them trained on. Then keep it."""
        if self._checkpoints:
            first_name, first = next(iter(self._checkpoints.items()))
            check_same_tokenizer({first_name: first, name: checkpoint})
        recorded = {other: c.data() for other, c in self._checkpoints.items() if c.data() is not None}
        if self.settings.corpus is None and checkpoint.data() is not None and recorded:
            other, data = next(iter(recorded.items()))
            if checkpoint.data() != data:
                ours, theirs = asdict(checkpoint.data()), asdict(data)
                differing = ", ".join(f"{key} {ours[key]} vs {theirs[key]}" for key in ours if ours[key] != theirs[key])
                raise ForethoughtError(f"{name} was trained on other data than {other} ({differing}): their held-out "
                                       "documents differ; give `corpus` to read both on one text")
        self.settings.layer_list(n_layers(checkpoint.model.config))
        self._checkpoints[name] = checkpoint

    # ---- what is probed

    @property
    def names(self) -> list[str]:
        """The checkpoints, then the random-init control (if ``random_init``)."""
        return [*(name for name in self._checkpoints if name != CONTROL), *([CONTROL] if self.settings.random_init
                                                                            else [])]

    @property
    def computed(self) -> dict[str, list[str]]:
        """{probe kind: checkpoints whose probes of that kind are computed}."""
        done: dict[str, list[str]] = {}
        for name, kind in self._scores:
            done.setdefault(kind, []).append(name)
        return done

    def layers(self, name: str) -> list[int]:
        """The residual layers probed in checkpoint ``name``."""
        return self.settings.layer_list(n_layers(self.checkpoint(name).model.config))

    @property
    def taus(self) -> list[int]:
        return self.settings.tau_list()

    @property
    def heldout(self) -> TextData:
        """The held-out text's description."""
        return self._read_heldout()[0]

    @property
    def sample(self) -> HeldOutSample:
        """The held-out sample every checkpoint is probed on: its sequences, their clusters and texts."""
        return self._read_heldout()[1]

    @property
    def tokens(self) -> np.ndarray:
        """The held-out sequences every checkpoint is probed on [n, seq]."""
        return self.sample.tokens

    def _read_heldout(self) -> tuple[TextData, HeldOutSample]:
        if self._heldout is None:
            self._heldout = heldout_tokens(self._checkpoints, self.settings)
        return self._heldout

    def checkpoint(self, name: str) -> LMCheckpoint:
        """The checkpoint called ``name``; the control is made on first use (an object, never saved) and kept."""
        if name == CONTROL and self.settings.random_init:
            if CONTROL not in self._checkpoints:
                self._checkpoints[CONTROL] = control_checkpoint(next(iter(self._checkpoints.values())),
                                                                self.settings.seed)
            return self._checkpoints[CONTROL]
        if name not in self._checkpoints or name == CONTROL:
            raise ForethoughtError(f"no checkpoint named {name!r}; this comparison holds {', '.join(self.names)}")
        return self._checkpoints[name]

    # ---- computing (lazily, once)

    def cache(self, name: str) -> ResidualCache:
        """Checkpoint ``name``'s residuals over :attr:`tokens`, cached in ``folder/caches/<name>``."""
        if name not in self._caches:
            checkpoint, started = self.checkpoint(name), time.perf_counter()
            self._caches[name] = build_cache(
                checkpoint, self.tokens, self.folder / "caches" / _folder_name(name), self.layers(name),
                self.settings.batch_sequences, self._device, self.settings.progress, self.settings.precision)
            self.seconds[f"caching {name}"] = round(time.perf_counter() - started, 1)
        return self._caches[name]

    def _config(self, kind: str) -> FutureProbeConfig:
        return (self.settings.lens_config(self._device) if kind == LOGIT_LENS
                else self.settings.probe_config(self._device, kind))

    @quiet_loading()
    def scores(self, name: str, kind: str | None = None) -> ProbeScores:
        """Per-example held-out scores of checkpoint ``name``'s (layer, τ) probes of ``kind`` (or the logit
        lens: ``kind="logit lens"``); fitted on first request, then read from memory or ``folder/scores``."""
        kind = self._kind(kind)
        if (name, kind) not in self._scores:
            config, cache = self._config(kind), self.cache(name)
            started = time.perf_counter()
            self._scores[name, kind] = probe_scores(
                cache, self.checkpoint(name).model, LENS_TAUS if kind == LOGIT_LENS else self.taus,
                config, self.folder / "scores" / _folder_name(name), self.settings.progress, self.split(config),
            ).on(self.sample.clusters, self.sample.texts)
            self.seconds[f"{kind} {name}"] = round(time.perf_counter() - started, 1)
        return self._scores[name, kind]

    @quiet_loading()
    def validation_scores(self, name: str, kind: str | None = None) -> ProbeScores:
        """Checkpoint ``name``'s probes of ``kind`` scored on their validation sequences (where best layers are
        chosen), from the stored probes."""
        kind = self._kind(kind)
        if kind == LOGIT_LENS:
            raise ForethoughtError("the logit lens is not fitted: it has no validation split")
        config = self._config(kind)
        return validation_scores(self.cache(name), self.checkpoint(name).model, self.taus, config,
                                 self.folder / "scores" / _folder_name(name), self.settings.progress,
                                 self.split(config)).on(self.sample.clusters, self.sample.texts)

    def best_layers(self, name: str, kind: str | None = None, metric: str = "top1") -> dict[int, int]:
        """{τ: the layer whose ``kind`` probe of checkpoint ``name`` scores best on ``metric`` on the validation
        sequences}: a choice made without the test examples, so the test score of the chosen layer is unbiased."""
        return best_by_tau(self.validation_rows(name, kind), metric)

    def validation_rows(self, name: str, kind: str | None = None) -> pd.DataFrame:
        """Tidy rows of :meth:`validation_scores` (split "validation")."""
        kind = self._kind(kind)
        if (name, kind, VALIDATION) not in self._rows:
            self._rows[name, kind, VALIDATION] = score_rows(self.validation_scores(name, kind), name,
                                                            self._target(kind)).assign(split=VALIDATION)
        return self._rows[name, kind, VALIDATION]

    @quiet_loading()
    def probe(self, name: str, layer: int, tau: int, kind: str | None = None) -> Probe:
        """Checkpoint ``name``'s fitted probe of x[t+τ] from h[layer, t] (kind: the settings' by default), to
        hold: ``weight``, ``bias``, ``classes``, ``predict(h)``, ``directions(k)``."""
        kind = self._kind(kind)
        if kind == LOGIT_LENS:
            raise ForethoughtError("the logit lens is the model's own readout; hold a fitted kind's probe")
        self._check_grid([name], [layer], [tau])
        config = self._config(kind)
        grid = fitted_probes(self.cache(name), self.checkpoint(name).model, self.taus, config,
                             self.folder / "scores" / _folder_name(name), self.settings.progress, self.split(config))
        return grid.probe(layer, tau)

    def split(self, config: FutureProbeConfig) -> ProbeSplit:
        """The held-out split of probes fitted as ``config``, and their classes: one per class set, shared by every
        checkpoint's probes and the count baselines they are drawn beside. Warns when its test sequences come from
        fewer than :data:`FEW_DOCUMENTS` documents: intervals that resample so few clusters are unreliable."""
        key = (config.top_k if config.in_topk else None, config.test_fraction, config.validation_fraction)
        if key not in self._splits:
            self._splits[key] = config.split(self.tokens, self.sample.clusters)
            documents = len(np.unique(self.sample.clusters[self._splits[key].test]))
            if documents < FEW_DOCUMENTS:
                log.warning("the probes' test sequences come from %d held-out documents only: intervals that resample "
                            "them are unreliable (a larger `max_sequences`, or a corpus of more documents)", documents)
        return self._splits[key]

    def compute(self, kinds: str | Sequence[str] | None = None) -> Probing:
        """Probe every checkpoint with each of ``kinds`` (default: the settings' kind), and the logit lens."""
        for kind in self._kinds(kinds):
            missing = [name for name in self.names if {(name, kind), (name, LOGIT_LENS)} - self._scores.keys()]
            shown = self.settings.progress and missing
            for name in progress_bar(missing, desc=f"probing ({kind})", disable=not shown):
                self.scores(name, kind)
                self.scores(name, LOGIT_LENS)
        return self

    def _kind(self, kind: str | None) -> str:
        kind = kind or self.settings.kind
        if kind not in (*KINDS, LOGIT_LENS):
            raise ForethoughtError(f"unknown probe kind {kind!r}; choose one of {', '.join((*KINDS, LOGIT_LENS))}")
        return kind

    def _kinds(self, kinds: str | Sequence[str] | None) -> list[str]:
        """``kinds`` as a list; None: the kinds computed so far, or the settings' kind."""
        if kinds is None:
            return [kind for kind in self.computed if kind != LOGIT_LENS] or [self.settings.kind]
        return [self._kind(kind) for kind in ([kinds] if isinstance(kinds, str) else kinds) if kind != LOGIT_LENS]

    def _check_grid(self, names: Sequence[str], layers: Sequence[int] | None, taus: Sequence[int] | None) -> None:
        """Refuse layers or τ outside what these checkpoints are probed at, saying what they are probed at."""
        missing_taus = sorted(set(taus or ()) - set(self.taus))
        if missing_taus:
            raise ForethoughtError(f"τ {missing_taus} not computed: this comparison probes τ "
                                   f"{', '.join(map(str, self.taus))} (set taus= when building it)")
        for name in names:
            missing = sorted(set(layers or ()) - set(self.layers(name)))
            if missing:
                raise ForethoughtError(f"layer {missing} not computed for {name!r}: it is probed at layers "
                                       f"{', '.join(map(str, self.layers(name)))}")

    # ---- results

    def baselines(self, kind: str | None = None) -> BaselineScores:
        """The unigram and skip-bigram count baselines on the held-out examples of ``kind``'s probes, over their
        classes, counted on the checkpoints' training tokens where the held-out text is their data (else on the
        probes' training split)."""
        kind = self._kind(kind)
        target = self._target(kind)
        if target not in self._baselines:
            split = self.split(self._config(kind))
            vocab_size = self.checkpoint(self.names[0]).model.config.vocab_size
            baselines = count_baselines(self.tokens, split.train, split.test, self.taus, vocab_size,
                                        classes=split.classes, counted=self.counted())
            self._baselines[target] = replace(baselines, clusters=self.sample.clusters[baselines.sequence_ids],
                                              texts=self.sample.texts[baselines.sequence_ids])
        return self._baselines[target]

    def counted(self) -> np.ndarray | None:
        """The checkpoints' own training sequences [m, T] where the held-out text is their data (the count
        baselines then know what the models saw); None for another corpus."""
        if self._counted is _UNREAD:
            self._counted = counted_sequences(self._checkpoints, self.settings)
        return self._counted

    def _target(self, kind: str) -> str:
        """What the probes of ``kind`` predict (the logit lens: the run's classes)."""
        return self.settings.target("lens" if kind == LOGIT_LENS else kind)

    def rows(self, name: str, kind: str | None = None, by_text: bool = False) -> pd.DataFrame:
        """Tidy rows of :meth:`scores` (their bootstrap intervals are computed once); ``by_text``: per text of a
        mixed held-out sample (split "test: <text>") instead of over the whole sample."""
        kind = self._kind(kind)
        if (name, kind, by_text) not in self._rows:
            self._rows[name, kind, by_text] = score_rows(self.scores(name, kind), name, self._target(kind),
                                                         LOGIT_LENS if kind == LOGIT_LENS else None, by_text)
        return self._rows[name, kind, by_text]

    def baseline_rows(self, kind: str | None = None, by_text: bool = False) -> pd.DataFrame:
        """Tidy rows of :meth:`baselines` (checkpoint "baseline")."""
        kind = self._kind(kind)
        return self.baselines(kind).table(by_text).assign(checkpoint=BASELINE, target=self._target(kind))

    def beyond_counts(self, name: str, kind: str | None = None, by_text: bool = False,
                      baseline: str = SKIP_BIGRAM) -> pd.DataFrame:
        """Paired differences probe − ``baseline`` (skip-bigram or unigram) per (layer, τ, metric) of checkpoint
        ``name`` (on the same examples, intervals resampling the same clusters): what the residual stream tells about
        x[t+τ] beyond the counts (beyond the class prior, for the unigram). The logit lens (``kind="logit lens"``)
        is read in the probes' classes."""
        kind = self._kind(kind)
        rows = self.scores(name, kind).minus_baseline(self.baselines(kind), baseline, by_text)
        rows = rows.assign(checkpoint=name, target=self._target(kind))
        return rows.assign(probe=f"{LOGIT_LENS} − {baseline}") if kind == LOGIT_LENS else rows

    def table(self, kinds: str | Sequence[str] | None = None, by_text: bool = False) -> pd.DataFrame:
        """The tidy table (DESIGN.md's columns) of ``kinds`` (default: those computed, or the settings' kind),
        row for row as ``forethought probe`` writes it (less the probes' validation rows, :meth:`validation_rows`): per
        checkpoint its probes and its logit lens (τ = 1); the
        count baselines for those probes' classes; each checkpoint's probe − skip-bigram, probe − unigram and lens −
        skip-bigram; and the ``flag`` column (:func:`flag_priors`).
        ``by_text``: the same rows per text of a mixed held-out sample (split "test: <text>"; none for one text)."""
        kinds = self._kinds(kinds)
        self.compute(kinds)
        frames = [self.rows(name, kind, by_text) for name in self.names for kind in [*kinds, LOGIT_LENS]]
        frames += [self.baseline_rows(kind, by_text) for kind in kinds]
        if self._target(LOGIT_LENS) not in {self._target(kind) for kind in kinds}:
            frames.append(self.baseline_rows(LOGIT_LENS, by_text))  # the lens's classes differ from every probe's
        frames += [self.beyond_counts(name, kind, by_text, baseline) for kind in kinds for name in self.names
                   for baseline in (SKIP_BIGRAM, UNIGRAM)]
        frames += [self.beyond_counts(name, LOGIT_LENS, by_text) for name in self.names]
        return flag_priors(pd.concat(frames, ignore_index=True), kinds)

    def difference(self, a: str, b: str, kind: str | None = None, by_text: bool = False) -> pd.DataFrame:
        """Paired differences a − b per (layer, τ, metric) on the same held-out examples, with 95 % bootstrap
        intervals resampling the same clusters for both (a = vanilla, b = myopic: the pre-caching estimate);
        ``by_text``: per text of a mixed held-out sample."""
        kind = self._kind(kind)
        scores_a, scores_b = self.scores(a, kind), self.scores(b, kind)
        shared = scores_a.values.keys() & scores_b.values.keys()  # the layers both have (depths may differ)
        if not shared:
            raise ForethoughtError(f"{a!r} and {b!r} have no probed layer in common")
        restricted = [s.with_values({key: s.values[key] for key in sorted(shared)}) for s in (scores_a, scores_b)]
        return restricted[0].minus(restricted[1], by_text).assign(checkpoint=f"{a} − {b}")

    def kinds_difference(self, name: str, a: str, b: str, by_text: bool = False) -> pd.DataFrame:
        """Paired differences of checkpoint ``name``'s probes of kind ``a`` − kind ``b`` per (layer, τ, metric) on
        the same examples (e.g. mlp − topk: what one hidden layer reads beyond a linear probe; rows' probe
        "a − b")."""
        configs = [self._config(self._kind(kind)) for kind in (a, b)]
        if configs[0].in_topk != configs[1].in_topk or (configs[0].in_topk and configs[0].top_k != configs[1].top_k):
            raise ForethoughtError(f"{a} and {b} probes predict different classes: compare kinds of one class set")
        rows = self.scores(name, a).minus(self.scores(name, b), by_text)
        return rows.assign(checkpoint=name, probe=f"{a} − {b}", target=self._target(a))

    def predictions(self, name: str, layer: int, tau: int, n: int = 10, kind: str | None = None,
                    top: int = 5) -> pd.DataFrame:
        """The probe at (``layer``, ``tau``) at ``n`` held-out test positions, as text: the context up to x[t],
        the true x[t+τ], the probe's ``top`` predicted tokens, and the model's own next-token prediction x̂[t+1].
        Positions: spread evenly over the probe split's test sequences (the same ones for every checkpoint)."""
        probe = self.probe(name, layer, tau, kind)
        checkpoint, tokens = self.checkpoint(name), self.tokens
        test = self.split(self._config(self._kind(kind))).test
        positions = tokens.shape[1] - max(self.taus)  # the probed positions t of a sequence
        picks = np.linspace(0, len(test) * positions - 1, num=min(n, len(test) * positions)).astype(int)
        sequences, ts = test[picks // positions], picks % positions
        h = torch.from_numpy(self.cache(name).read(sequences, [layer])[0][np.arange(len(picks)), ts].astype(np.float32))
        predicted = probe.predict(h).topk(min(top, len(probe.classes)), dim=-1).indices.numpy()
        model = checkpoint.model.to(self._device)
        with torch.no_grad():
            logits = model(torch.from_numpy(tokens[sequences]).to(self._device), use_cache=False).logits
        own = logits[np.arange(len(picks)), ts].argmax(-1).cpu().numpy()
        tokenizer = checkpoint.tokenizer

        def text(token: int) -> str:
            return "(other)" if token < 0 else repr(tokenizer.decode([int(token)]))

        return pd.DataFrame({
            "sequence": sequences, "t": ts,
            "context": [tokenizer.decode(tokens[s, max(0, t - 11): t + 1].tolist()) for s, t in zip(sequences, ts)],
            f"x[t+{tau}]": [text(tokens[s, t + tau]) for s, t in zip(sequences, ts)],
            f"probe top-{top}": [", ".join(text(probe.classes[c]) for c in row) for row in predicted],
            "model's x̂[t+1]": [text(token) for token in own],
        })


_UNREAD = object()


def _folder_name(name: str) -> str:
    return name.replace("/", "_")


def load_checkpoints(named: dict[str, str]) -> dict[str, LMCheckpoint]:
    """Load every named checkpoint (one that cannot be loaded is named with the reason); they must share a
    tokenizer, to be probed on the same tokens."""
    checkpoints = {name: load_checkpoint(name, source) for name, source in named.items()}
    check_same_tokenizer(checkpoints)
    return checkpoints


def load_checkpoint(name: str, source: str | Path) -> LMCheckpoint:
    try:
        return LMCheckpoint.load(source)
    except (ForethoughtError, OSError, ValueError) as error:
        raise ForethoughtError(f"checkpoint {name!r} ({source}) cannot be loaded: {error}") from None


def heldout_tokens(checkpoints: dict[str, LMCheckpoint], settings: ProbeSettings) -> tuple[TextData, HeldOutSample]:
    """The held-out data and the seeded sample of its test documents probed (``max_sequences`` sequences)."""
    data = heldout_data(checkpoints, settings.corpus, settings.layout, settings.seq_len, settings.prepend_bos)
    first = next(iter(checkpoints.values()))
    return data, heldout_sample(data, first.tokenizer, settings.tokens_root, settings.max_sequences, settings.seed)


def control_checkpoint(like: LMCheckpoint, seed: int) -> LMCheckpoint:
    """A random-init model of ``like``'s architecture, any family, with its tokenizer: the control, in memory."""
    return LMCheckpoint(f"random init of {like.source} (seed {seed})", build_lm(like.model.config, seed=seed).eval(),
                        like.tokenizer, None)


def score_rows(scores: ProbeScores, checkpoint: str, target: str, probe: str | None = None,
               by_text: bool = False) -> pd.DataFrame:
    """Tidy rows of ``scores`` (named ``probe``, e.g. :data:`LOGIT_LENS`, instead of the scores' kind)."""
    table = scores.table(by_text).assign(checkpoint=checkpoint, target=target)
    return table if probe is None else table.assign(probe=probe)


def counted_sequences(checkpoints: dict[str, LMCheckpoint], settings: ProbeSettings) -> np.ndarray | None:
    """The checkpoints' own training sequences [m, T] where the held-out text is their data; None for another
    corpus (the baselines count the probes' training split)."""
    if settings.corpus is not None:
        return None
    data = heldout_data(checkpoints, None, settings.layout, settings.seq_len, settings.prepend_bos)
    return data.load(next(iter(checkpoints.values())).tokenizer, settings.tokens_root)["train"]


@dataclass
class ProbeRun:
    """What probing a set of checkpoints produced, before it is written: rows, and per-example scores."""

    data: TextData
    tokens: np.ndarray  # [n, seq] the held-out sequences probed
    rows: list[dict[str, Any]]
    text_rows: list[dict[str, Any]]  # the same per text of a mixed held-out sample (none for one text)
    scores: dict[str, ProbeScores]  # per checkpoint (and the control)
    sources: dict[str, str]
    tokenization: dict[str, Any]  # tokenizer, BOS policy and how the text was cut (checked equal for all)
    baselines_counted_on: str  # which tokens the count baselines count
    origins: dict[str, dict[str, Any]]  # converted models' cards (where a model came from, licence)
    split: ProbeSplit  # the probes', the lens' and the baselines' sequences, and the classes they predict
    engine: Probing  # what computed it: held probes, predictions, more kinds


def counted_on(counted: np.ndarray | None, split: ProbeSplit) -> str:
    """What the count baselines counted, in words (``meta.json``)."""
    if counted is not None:
        return f"the models' {counted.size:,} training tokens ({len(counted):,} sequences)"
    return f"the probes' training split of the held-out text ({len(split.train):,} sequences)"


def flag_priors(table: pd.DataFrame, kinds: Sequence[str]) -> pd.DataFrame:
    """``table`` with the ``flag`` column: :data:`AT_PRIOR` on each probe row (of ``kinds``) whose probe beats the
    unigram — the class prior, whose top-1 is the majority class — neither in top-1 nor in cross-entropy (paired
    95 % intervals wholly on the better side of 0), "" on the other probe rows, None on every other row. A probe at
    the prior has learnt nothing the token frequencies do not give: its row is a number, not a result."""
    flags = pd.Series(None, index=table.index, dtype="str")  # as a results.parquet reads back
    key = ["checkpoint", "layer", "tau", "split"]
    for kind in kinds:
        beyond = table[table["probe"] == f"{kind} − {UNIGRAM}"]
        better = ((beyond["metric"] == "top1") & (beyond["ci_low"] > 0)) | (
            (beyond["metric"] == "cross_entropy") & (beyond["ci_high"] < 0))
        beats = better.groupby([beyond[column] for column in key]).any()
        probes = table[(table["probe"] == kind) & table["layer"].notna()]
        found = [beats.get(tuple(row), False) for row in probes[key].itertuples(index=False)]
        flags[probes.index] = ["" if beat else AT_PRIOR for beat in found]
    return table.assign(flag=flags)


def probe_checkpoints(config: ProbeSettings, checkpoints: dict[str, LMCheckpoint], out: str | Path,
                      heldout: tuple[TextData, HeldOutSample] | None = None) -> ProbeRun:
    """Cache and probe ``checkpoints`` (and the control) on held-out text into the run folder ``out``; add the
    logit lens and the baselines. The held-out data, layers and τ are checked before the folder is written;
    ``heldout`` is the data and sample when drawn already (:func:`heldout_tokens`)."""
    check_out(out, config)
    engine = Probing(checkpoints, config, out, heldout)
    tokens = engine.tokens
    if max(config.tau_list()) >= tokens.shape[1]:
        raise ForethoughtError(f"taus reach {max(config.tau_list())}, but the held-out sequences have "
                               f"{tokens.shape[1]} tokens: τ must stay below that")
    if config.kind in TOPK_KINDS:
        check_top_k(config.top_k, next(iter(checkpoints.values())).model.config.vocab_size)
    engine.split(config.probe_config(engine._device))  # a sample too small to split: refused before writing
    prepare_out(out, config)
    kinds = [config.kind, *(["mlp"] if config.nonlinear else [])]
    rows, text_rows = (engine.table(kinds, by_text=by_text).to_dict("records") for by_text in (False, True))
    rows += pd.concat([engine.validation_rows(name, kind) for name in engine.names for kind in kinds]
                      ).to_dict("records")
    if config.nonlinear:  # what one hidden layer reads beyond the linear probe, on the same examples
        for by_text, into in ((False, rows), (True, text_rows)):
            into += pd.concat([engine.kinds_difference(name, "mlp", config.kind, by_text) for name in engine.names]
                              ).to_dict("records")
    first = next(iter(checkpoints.values()))
    names = engine.names
    split = engine.split(config.probe_config(engine._device))
    return ProbeRun(engine.heldout, tokens, rows, text_rows, {name: engine.scores(name) for name in names},
                    {name: engine.checkpoint(name).source for name in names}, tokenization(first.tokenizer,
                    engine.heldout), counted_on(engine.counted(), split),
                    {name: c.origin for name, c in checkpoints.items() if c.origin}, split, engine)


def probe_meta(run: ProbeRun) -> dict[str, Any]:
    """Provenance of a probing run for ``meta.json``."""
    return run_meta(data=asdict(run.data), heldout=run.engine.sample.composition(),
                    checkpoints=run.sources, models=run.origins, tokenization=run.tokenization,
                    parameters={name: non_embedding_parameters(run.engine.checkpoint(name).model)
                                for name in run.sources},  # sizes (trend) without the checkpoints
                    baselines_counted_on=run.baselines_counted_on, probe_split=split_record(run.split),
                    processing_mode=PROCESSING_MODE, seconds=run.engine.seconds)


def split_record(split: ProbeSplit) -> dict[str, Any]:
    """The probe split in ``meta.json``: each part's sequence ids (into the held-out sequences probed) and the
    top-K classes' token ids (None: every token is a class)."""
    return {"train": split.train.tolist(), "validation": split.validation.tolist(), "test": split.test.tolist(),
            "classes": None if split.classes is None else split.classes.tolist()}
