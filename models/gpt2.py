"""GPT-2 builders and loaders: the token language model and the regression model of Wu et al. (2024).

Both are Hugging Face ``PreTrainedModel`` s, so a checkpoint is a ``save_pretrained`` folder that every
tool in the ecosystem (TransformerLens's ``boot_transformers`` included) can load. Language models of other
families (Llama, …) load and build through the same two functions: ``kind="lm"`` is any causal LM.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub.dataclasses import strict
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.models.gpt2.modeling_gpt2 import GPT2Model, GPT2PreTrainedModel
from transformers.utils import logging as transformers_logging

from forethought.core.errors import ForethoughtError, looks_like_a_path, one_line
from forethought.core.files import check_folder_digests, read_json
from forethought.models.hub import hub_reachable

ModelKind = Literal["lm", "regression"]


def gpt2_config(
    n_layer: int,
    d_model: int,
    n_head: int,
    *,
    vocab_size: int = 50257,
    n_positions: int = 1024,
    activation: str = "gelu_new",
    dropout: float = 0.0,
) -> GPT2Config:
    """A GPT2Config for a model trained from scratch (sdpa attention, MLP width 4·d_model)."""
    if d_model % n_head:
        raise ForethoughtError(f"d_model={d_model} is not divisible by n_head={n_head}")
    return GPT2Config(
        n_layer=n_layer,
        n_embd=d_model,
        n_head=n_head,
        vocab_size=vocab_size,
        n_positions=n_positions,
        activation_function=activation,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
        attn_implementation="sdpa",
    )


def build_lm(config: PretrainedConfig, seed: int | None = None) -> PreTrainedModel:
    """A randomly initialised causal language model of ``config``'s architecture (GPT-2, Llama, …);
    ``seed`` makes the initialisation reproducible."""
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


@strict(accept_kwargs=True)
@dataclass(repr=False)
class GPT2RegressionConfig(GPT2Config):
    """GPT2Config plus the sizes of the continuous input and output of the regression model."""

    model_type = "gpt2-regression"
    in_dim: int = 2
    out_dim: int = 1


class GPT2RegressionModel(GPT2PreTrainedModel):
    """A GPT-2 trunk for continuous sequences: Linear(in_dim → d) in, Linear(d → out_dim) out.

    The linear input map replaces the token embedding (``transformer.wte`` is a 1-row stub, never used);
    learned position embeddings are kept. As in the paper's code, the two linear maps keep PyTorch's
    default initialisation (not GPT-2's N(0, 0.02)): the input then dominates the position embeddings, and
    a random-init model is the nonlinear expansion of x_t that the probe controls rely on.
    """

    config_class = GPT2RegressionConfig

    def __init__(self, config: GPT2RegressionConfig):
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.read_in = nn.Linear(config.in_dim, config.n_embd)
        self.read_out = nn.Linear(config.n_embd, config.out_dim)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.read_in or module is self.read_out:
            return  # keep nn.Linear's default initialisation, drawn in __init__
        super()._init_weights(module)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [batch, seq, in_dim] → predictions [batch, seq, out_dim]."""
        embeds = self.read_in(inputs)  # [batch, seq, d_model]
        hidden = self.transformer(inputs_embeds=embeds, use_cache=False).last_hidden_state
        return self.read_out(hidden)


def regression_config(in_dim: int, out_dim: int, **gpt2_kwargs) -> GPT2RegressionConfig:
    """A GPT2RegressionConfig from the same arguments as :func:`gpt2_config` (vocabulary unused)."""
    base = gpt2_config(vocab_size=1, **gpt2_kwargs).to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        base.pop(key, None)
    return GPT2RegressionConfig(in_dim=in_dim, out_dim=out_dim, **base)


def build_regression(config: GPT2RegressionConfig, seed: int | None = None) -> GPT2RegressionModel:
    """A randomly initialised regression model; ``seed`` makes the initialisation reproducible."""
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return GPT2RegressionModel(config)


_CLASSES: dict[ModelKind, type] = {
    "lm": AutoModelForCausalLM,  # any causal language model
    "regression": GPT2RegressionModel,
}
CAUSAL_LM_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _expected(kind: ModelKind, architecture: str) -> str | None:
    """What a checkpoint of ``kind`` should hold, if ``architecture`` is not it (None: it is)."""
    if kind == "lm":
        return None if architecture in CAUSAL_LM_CLASSES else "causal language model"
    return None if architecture == GPT2RegressionModel.__name__ else GPT2RegressionModel.__name__


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Switch off transformers' per-file load/save progress bars (they drown our own); restored afterwards.
    Also a decorator: ``@quiet_loading()``."""
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


@quiet_loading()
def load_model(source: str | Path, kind: ModelKind) -> PreTrainedModel:
    """Load a ``save_pretrained`` folder (or, for ``kind="lm"``, a hub id) and check it is ``kind``
    (``lm``: any causal language model transformers knows; ``regression``: :class:`GPT2RegressionModel`)."""
    folder = Path(source)
    if folder.exists():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ForethoughtError(f"checkpoint folder {folder} has no config.json")
        check_folder_digests(folder, "the checkpoint is damaged: train it again, or load another")
        architectures = read_json(config_file, "the checkpoint is damaged").get("architectures") or ["?"]
        if not isinstance(architectures, list) or not isinstance(architectures[0], str):
            raise ForethoughtError(f"{config_file} is damaged: architectures holds {architectures!r:.40}")
        if expected := _expected(kind, architectures[0]):
            raise ForethoughtError(
                f"checkpoint {folder} holds a {architectures[0]}, expected a {expected} ({kind} model)"
            )
    elif kind == "regression":
        raise ForethoughtError(f"checkpoint folder {folder} does not exist")
    elif looks_like_a_path(str(source)):
        raise ForethoughtError(f"checkpoint folder {source} does not exist")
    elif not hub_reachable():
        raise ForethoughtError(f"{source} is not a folder, and the Hugging Face hub cannot be reached to fetch it")
    try:
        model = _CLASSES[kind].from_pretrained(str(source))
    except OSError as error:  # not a folder, and the hub does not have it (or is unreachable)
        raise ForethoughtError(
            f"{source} is neither a checkpoint folder nor a loadable hub id: {error}"
        ) from error
    except (SafetensorError, ValueError, RuntimeError) as error:  # truncated or mismatched weight files
        reason = one_line(error, 200)
        raise ForethoughtError(f"the weights in {source} cannot be loaded (damaged or incomplete: {reason})") from None
    except pickle.UnpicklingError:  # torch.load(weights_only=True) refused a pickle that is not just tensors
        raise ForethoughtError(f"the weights in {source} hold Python objects besides tensors: refused, since loading "
                               "them could run code (save the model as safetensors from a source you trust)") from None
    except (TypeError, AttributeError, KeyError) as error:  # a config.json with values of the wrong type
        raise ForethoughtError(f"the config of {source} is damaged ({one_line(error, 200)})") from None
    check_blocks(model.config, str(source))
    return model


def check_blocks(config: PretrainedConfig, source: str) -> None:
    """Refuse a model config with no transformer blocks (``n_layer`` ≤ 0 builds an empty stack)."""
    n_layer = getattr(config, "num_hidden_layers", None)
    if not isinstance(n_layer, int) or n_layer < 1:
        raise ForethoughtError(f"the config of {source} has {n_layer!r} layers; a model needs at least one")
