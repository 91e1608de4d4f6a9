"""Language models on text: the settings of ``forethought train``, the checkpoints it writes, and
:class:`LMCheckpoint`, any causal language model loaded for analysis.

A run folder holds ``train_config.json`` and ``checkpoints/step-N/``; every checkpoint folder is complete on
its own — ``save_pretrained`` weights, the tokenizer files, and ``forethought.json`` (the training settings,
the model source and the :class:`~models.tasks.text.TextData` it was trained on) — so
``TransformerBridge.boot_transformers(folder)`` and ``AutoModelForCausalLM.from_pretrained(folder)`` load it
offline, and an analysis can rebuild the held-out documents it never saw. Models come from any source
:mod:`models.sources` knows (folders, run folders, hub ids, ``smollm2-135m``, ``gguf:PATH``).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from forethought.core.errors import ForethoughtError, did_you_mean, looks_like_a_path, one_line
from forethought.core.files import check_out_folder, read_json, run_lock
from forethought.core.settings import (
    TRAINING_SETTINGS,
    Presets,
    check_preset,
    check_recorded_settings,
    check_settings,
    record_settings,
)
from forethought.core.threads import thread_settings
from forethought.models.distributed import Distributed
from forethought.models.families import architecture
from forethought.models.gpt2 import CAUSAL_LM_CLASSES, build_lm, check_blocks, gpt2_config, load_model
from forethought.models.hub import hub_reachable
from forethought.models.mtp import NEXT_TOKEN, MultiTokenTask, add_heads, extra_heads, load_heads, objective_heads
from forethought.models.myopic import check_myopic_support
from forethought.models.sources import NAMED_MODELS, model_folder, source_card
from forethought.models.tasks.bpe import bpe_size, corpus_bpe
from forethought.models.tasks.text import TextData, TextTask, check_vocabulary, gpt2_tokenizer, tokenizer_fingerprint
from forethought.models.train import TrainConfig, TrainResult, TrainSettings, resolve_device, train

DESCRIPTION_FILE = "forethought.json"
LM_PRESETS: dict[str, dict[str, int]] = {  # from-scratch architectures (GPT-2 small is the paper's)
    "gpt2-small": dict(n_layer=12, d_model=768, n_head=12),  # 124M parameters
    "gpt2-mini": dict(n_layer=6, d_model=384, n_head=6),
    "gpt2-tiny": dict(n_layer=4, d_model=256, n_head=4),  # the cpu preset's
    "gpt2-nano": dict(n_layer=3, d_model=128, n_head=4),
    "gpt2-micro": dict(n_layer=2, d_model=64, n_head=2),  # CPU demonstrations and tests
}


LM_TRAIN_PRESETS: dict[str, dict[str, Any]] = {  # starting values of ``forethought train --preset``
    # 4 layers × 256 and a 4,096-token BPE of the embedded corpus, packed 128-token windows: learns language
    # well past count statistics in about 15 minutes on 2 CPU cores (README: results)
    "cpu": dict(model="gpt2-tiny", tokenizer="bpe:4096", layout="packed", seq_len=128, batch_size=16, lr=2e-3,
                warmup_frac=0.05, epochs=1.0, eval_every=250, checkpoint_every=500),
}


@dataclass
class LMTrainConfig(Presets):
    """Settings of ``forethought train``: a language model (GPT-2, Llama or GPT-NeoX family) on a text corpus,
    vanilla, myopic or multi-token.

    Defaults follow Wu et al.'s GPT-2 run on MS MARCO (first 64 tokens of each document, batch 512,
    lr 6e-4, warm-up 10 % — theirs was 1,000 of 9,100 steps —, cosine schedule, one epoch); the embedded corpus
    is a small stand-in for it.

    In Python, build it flat with ``LMTrainConfig.from_settings(lr=…)`` or ``from_preset``, or pass
    ``training=TrainSettings(…)`` whole.
    """

    # data
    corpus: str = "embedded"  # 'embedded', a local file or folder (txt, jsonl, parquet), or hf:NAME[:CONFIG]
    corpus_split: str = "train"  # which split of a hub dataset to read
    text_field: str = "text"  # the field of a jsonl / parquet / hub row that holds the text
    max_documents: int | None = None  # read only this many documents of the corpus (default: all)
    layout: str = "first"  # 'first': each document's first `seq_len` tokens (paper's); 'packed': cut across documents
    seq_len: int = 64  # tokens per training sequence
    split_seed: int = 0  # seeds the 90 / 1 / 9 % train / validation / test split by document
    tokens_root: str = "runs/tokens"  # token files are written (once) under here
    # model
    model: str = "gpt2-small"  # preset (gpt2-small|mini|tiny|nano|micro), folder, hub id, smollm2-135m, gguf:PATH
    from_pretrained: bool = False  # start from the folder's / hub model's weights (fine-tuning)
    tokenizer: str = "gpt2"  # 'gpt2', 'bpe:N' (fitted to the training documents), or a model source (its tokenizer)
    myopic: bool = False  # train with the myopic gradient
    objective: str = NEXT_TOKEN  # 'next-token', or 'mtp:K': K heads predict x[t+1] … x[t+K] (mean loss; models/mtp.py)
    dropout: float | None = None  # dropout rate (default: 0 for presets, a loaded model's own; > 0 slows myopic)
    # training
    epochs: float = 1.0  # passes over the training sequences (ignored when `steps` is set)
    steps: int | None = None  # optimiser steps (default: from epochs)
    seed: int = 0  # model initialisation and data order
    training: TrainSettings = field(default_factory=lambda: TrainSettings(
        batch_size=512, lr=6e-4, warmup_frac=0.1, eval_every=200, checkpoint_every=1000))
    out: str = "runs/lm"  # run folder: checkpoints and training history (resumed when rerun)
    device: str = "auto"  # 'auto': CUDA when available
    progress: bool = True  # show progress bars
    preset: str | None = None  # starting values: cpu (small, for 2 cores); flags override them (default: the paper's)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = LM_TRAIN_PRESETS

    def __post_init__(self):
        check_settings(self)
        check_preset(type(self), self.preset)
        if self.from_pretrained and self.model in LM_PRESETS:
            raise ForethoughtError(f"`from_pretrained` needs a folder or hub id; {self.model!r} is a preset")
        if self.epochs <= 0 and self.steps is None:
            raise ForethoughtError(f"epochs must be positive, got {self.epochs}")
        if objective_heads(self.objective) > 1 and self.myopic:
            raise ForethoughtError(f"objective {self.objective} trains positions for later tokens: it cannot be "
                                   "`myopic` too")
        if bpe_size(self.tokenizer) is not None and self.from_pretrained:
            raise ForethoughtError("`tokenizer` bpe:N makes a new vocabulary: it cannot fine-tune a pretrained model")
        self.data()  # validates layout, seq_len and the corpus name

    def data(self) -> TextData:
        return TextData(corpus=self.corpus, corpus_split=self.corpus_split, text_field=self.text_field,
                        max_documents=self.max_documents, layout=self.layout, seq_len=self.seq_len,
                        split_seed=self.split_seed)

    def train_config(self, n_train: int) -> TrainConfig:
        steps = self.steps if self.steps is not None else self.training.epoch_steps(self.epochs, n_train)
        return self.training.for_run(steps, self.seed, self.myopic, self.device, self.progress)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """``gpt2`` → :func:`gpt2_tokenizer`; otherwise the tokenizer of a model source (a folder or hub id with
    tokenizer files, ``smollm2-135m``, ``gguf:PATH``)."""
    if name == "gpt2":
        return gpt2_tokenizer()
    source = model_folder(name)
    if not Path(source).exists():  # a hub id: fetched only where the hub answers (no retries for minutes)
        if looks_like_a_path(source):
            raise ForethoughtError(f"tokenizer folder {source} does not exist")
        if not hub_reachable():
            raise ForethoughtError(f"{source} is not a folder, and the Hugging Face hub cannot be reached to fetch "
                                   "its tokenizer")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: a tokenizer file nested too deeply
        files = Path(source) / "tokenizer.json"
        where = f"{files} (or the other tokenizer files beside it)" if files.is_file() else name
        raise ForethoughtError(f"cannot load a tokenizer from {where}: {one_line(error, 200)}") from None


def lm_to_train(config: LMTrainConfig, vocab_size: int) -> PreTrainedModel:
    """The model a run starts from: a preset or another model's architecture (any causal-LM family), freshly
    initialised with ``config.seed``; or, with ``from_pretrained``, that model's weights."""
    if config.model in LM_PRESETS:
        model_config = gpt2_config(**LM_PRESETS[config.model], vocab_size=vocab_size,
                                   n_positions=max(1024, config.seq_len), dropout=config.dropout or 0.0)
        return build_lm(model_config, seed=config.seed)
    source = model_folder(config.model)
    model = (
        load_model(source, kind="lm") if config.from_pretrained else build_lm(_architecture(source), seed=config.seed)
    )
    if config.dropout is not None:
        for name in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout"):
            if hasattr(model.config, name):
                setattr(model.config, name, config.dropout)
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = config.dropout
    positions = model.config.max_position_embeddings
    if config.seq_len > positions:
        raise ForethoughtError(f"seq_len {config.seq_len} exceeds the {positions} positions of {config.model}")
    return model


def _architecture(source: str) -> PretrainedConfig:
    """The config of a folder or hub id (refusing models that are not causal language models)."""
    folder = Path(source)
    if folder.exists() and not (folder / "config.json").is_file():
        raise ForethoughtError(f"checkpoint folder {folder} has no config.json")
    if folder.exists():
        read_json(folder / "config.json", "the checkpoint is damaged")  # JSON, and an object
    if not folder.exists() and looks_like_a_path(source):
        raise ForethoughtError(f"model folder {source} does not exist")
    if not folder.exists() and not hub_reachable():
        raise ForethoughtError(f"{source} is neither a preset nor a folder"
                               f"{did_you_mean(source, [*LM_PRESETS, *NAMED_MODELS])}, and the Hugging Face hub "
                               "cannot be reached")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ForethoughtError(
            f"{source} is neither a preset, a checkpoint folder nor a loadable hub id: {one_line(error, 200)}"
        ) from None
    except (TypeError, AttributeError, KeyError, RecursionError) as error:  # a config.json of the wrong shape
        raise ForethoughtError(f"the config of {source} is damaged ({one_line(error, 200)})") from None
    check_blocks(config, source)
    if architecture(config) not in CAUSAL_LM_CLASSES:
        raise ForethoughtError(
            f"{source} holds a {architecture(config)} ({config.model_type}), not a causal language model"
        )
    return config


def train_lm(config: LMTrainConfig) -> TrainResult:
    """Tokenise (once), build or load the model, and train it into ``config.out`` (resuming if it is there).

    Under torchrun, rank 0 tokenises and writes the run's files first; the other ranks then reuse them.
    """
    out = check_out_folder(config.out)
    dist = Distributed.from_env(resolve_device(config.device))
    with run_lock(out) if dist.is_main else contextlib.nullcontext():
        return _train_lm(config, out, dist)


def _train_lm(config: LMTrainConfig, out: Path, dist: Distributed) -> TrainResult:
    check_recorded_settings(out / TRAINING_SETTINGS, config)  # a folder of another run: refused before tokenising
    data = config.data()
    size = bpe_size(config.tokenizer)
    with dist.main_first():
        tokenizer = load_tokenizer(config.tokenizer) if size is None else corpus_bpe(data, size, config.tokens_root)
        model = lm_to_train(config, vocab_size=len(tokenizer))
        check_vocabulary(tokenizer, model.config.vocab_size, config.model)
        if config.myopic:
            check_myopic_support(model)
        sequences = data.load(tokenizer, config.tokens_root)
        settings = record_settings(out / TRAINING_SETTINGS, config)
    description = {
        "model_source": config.model, "myopic": config.myopic, "myopic_cut": config.training.myopic_cut,
        "objective": config.objective,
        "data": asdict(data), "tokenizer": config.tokenizer,
        "n_sequences": {name: len(part) for name, part in sequences.items()}, "train_config": settings,
        "steps": config.train_config(len(sequences["train"])).steps,  # the run's planned last step
    }

    def save_extra(folder: Path) -> None:
        tokenizer.save_pretrained(folder)
        record = {**description, **thread_settings()}  # the weights may depend on them
        (folder / DESCRIPTION_FILE).write_text(json.dumps(record, indent=2) + "\n")

    add_heads(model, objective_heads(config.objective))
    task = MultiTokenTask(sequences["train"], model, seed=config.seed)
    return train(model, task, config.train_config(len(sequences["train"])), out,
                 eval_task=TextTask(sequences["validation"], seed=config.seed), save_extra=save_extra)


@dataclass
class LMCheckpoint:
    """A language model loaded for analysis, with its tokenizer and what it was trained on (if known)."""

    source: str  # the folder or hub id it was loaded from
    model: PreTrainedModel  # any causal language model (GPT-2, Llama, …)
    tokenizer: PreTrainedTokenizerBase
    description: dict[str, Any] | None  # forethought.json; None for models trained elsewhere
    origin: dict[str, Any] | None = None  # a converted model's card (models.sources); None otherwise

    @classmethod
    def load(cls, source: str | Path) -> LMCheckpoint:
        """Any source of :func:`models.sources.model_folder`: a checkpoint or run folder, a hub id,
        ``smollm2-135m`` or ``gguf:PATH`` (converted on first use)."""
        folder = model_folder(source)
        model = load_model(folder, kind="lm")
        description = read_description(folder)
        local = Path(folder).is_dir()
        has_tokenizer = local and (Path(folder) / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(str(folder)) if has_tokenizer or not local else gpt2_tokenizer()
        check_vocabulary(tokenizer, model.config.vocab_size, str(folder))
        return cls(str(folder), model.eval(), tokenizer, description, source_card(folder) if local else None)

    @property
    def heads(self) -> int:
        """K, the prediction heads it was trained with (``mtp:K``); 1 for next-token training or a model trained
        elsewhere."""
        return objective_heads((self.description or {}).get("objective", NEXT_TOKEN))

    def with_heads(self) -> PreTrainedModel:
        """Its model carrying the extra heads 2 … K read from beside the checkpoint (``model.mtp_heads``, covered by
        the checkpoint's digests), to score them; the model itself for K = 1. Idempotent."""
        if self.heads > 1 and extra_heads(self.model) is None:
            add_heads(self.model, self.heads)
            load_heads(self.model.mtp_heads, Path(self.source))
        return self.model

    def data(self) -> TextData | None:
        """The text data it was trained on, if recorded."""
        if self.description is None:
            return None
        known = {f.name for f in fields(TextData)}
        try:
            return TextData(**{k: v for k, v in self.description["data"].items() if k in known})
        except (TypeError, ValueError, ForethoughtError) as error:
            raise ForethoughtError(f"{Path(self.source) / DESCRIPTION_FILE} is damaged: its data settings cannot be "
                                   f"used ({one_line(error, 120)})") from None


# forethought.json's fields and their types (a file written by an older workbench may lack some)
_DESCRIPTION_TYPES: dict[str, type | tuple[type, ...]] = {
    "model_source": str, "myopic": bool, "myopic_cut": (str, type(None)), "objective": str, "data": dict,
    "tokenizer": (str, type(None)), "n_sequences": dict, "train_config": dict, "steps": int, "threads": int,
    "deterministic_algorithms": bool,
}


def read_description(folder: str | Path) -> dict[str, Any] | None:
    """A checkpoint's ``forethought.json`` (what it was trained on, and how), its fields' types checked; None for a
    model trained elsewhere."""
    path = Path(folder) / DESCRIPTION_FILE
    if not path.is_file():
        return None
    description = read_json(path, "the checkpoint is damaged")
    for name, kind in _DESCRIPTION_TYPES.items():
        if name in description and not isinstance(description[name], kind):
            raise ForethoughtError(f"{path} is damaged: {name} holds {description[name]!r:.40}, "
                                   f"a {type(description[name]).__name__}")
    return description


def check_same_tokenizer(checkpoints: dict[str, LMCheckpoint]) -> None:
    """Refuse checkpoints whose tokenizers map text (or BOS / EOS) to different ids: they cannot be fed, and
    probed on, the same tokens."""
    def identity(checkpoint: LMCheckpoint) -> tuple:
        tokenizer = checkpoint.tokenizer
        return tokenizer_fingerprint(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
    (first_name, first), *others = checkpoints.items()
    for name, checkpoint in others:
        if identity(checkpoint) != identity(first):
            raise ForethoughtError(
                f"checkpoint {name!r} uses another tokenizer than {first_name!r}: they cannot be "
                f"probed on the same tokens (vocabulary, BOS, EOS: {identity(checkpoint)} vs {identity(first)})"
            )
