"""forethought: do language models plan ahead? The user API, in one namespace::

    import forethought as ft
    comparison = ft.Comparison.from_checkpoints({"vanilla": "runs/lm-s0-vanilla", "myopic": "runs/lm-s0-myopic"})
    with ft.myopic(model):
        model(tokens, labels=tokens).loss.backward()   # the myopic gradient

The floors install beneath it — ``forethought.core`` (errors, files, settings), ``forethought.models``,
``forethought.probes``, ``forethought.analyses`` — and every name below is imported on first use, so
``import forethought`` itself costs nothing (the command line starts without torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# module → the names it gives the API ("name=Attribute.path" where the name is an attribute of another name)
_MODULES: dict[str, tuple[str, ...]] = {
    # experiments: a config dataclass in (its fields are the command's flags), a results object out
    "forethought.analyses.synthetic": ("SyntheticConfig", "run_synthetic", "SyntheticResults"),
    "forethought.analyses.pathstar": ("PathStarConfig", "run_pathstar", "PathStarResults"),
    "forethought.analyses.gap": ("GapConfig", "run_gap", "GapResults"),
    "forethought.analyses.probe": ("ProbeConfig", "run_probe"),
    "forethought.analyses.precache": ("PrecacheConfig", "run_precache"),
    "forethought.analyses.intervene": ("InterveneConfig", "run_intervene", "InterveneResults"),
    "forethought.analyses.across": ("AcrossConfig", "run_seeds", "run_trend"),
    # the Jupyter object, the engine beneath it, their settings
    "forethought.analyses.compare": ("CompareConfig", "run_compare", "Comparison"),
    "forethought.analyses.engine": ("Probing",),
    "forethought.analyses.probing": ("ProbeSettings",),
    # training and checkpoints
    "forethought.models.lm": ("LMTrainConfig", "train_lm", "LMCheckpoint", "load_checkpoint=LMCheckpoint.load"),
    "forethought.models.train": ("TrainSettings", "train"),
    "forethought.models.sources": ("model_folder",),
    "forethought.models.gpt2": ("gpt2_config", "build_lm"),
    "forethought.models.myopic": ("myopic",),
    "forethought.models.heldout": ("heldout_sample",),
    # residual streams and the gradient reaching them
    "forethought.probes.residuals": ("model_residuals", "bridge_residuals", "capture_residuals", "load_bridge",
                                     "hook_name"),
    "forethought.probes.gradients": ("future_gradient_split",),
    # edits of the residual stream (a context manager over any supported family, or TransformerLens hooks)
    "forethought.probes.interventions": ("intervene", "ProjectOut", "AddVector", "MeanAblate", "Erase", "Patch"),
    # concept erasure (LEACE at a rank, its random control) and an edit's own and future paths
    "forethought.probes.erasure": ("ErasureFit",),
    "forethought.probes.paths": ("path_logits", "path_effects"),
    # one error type: every bad input is one line naming the problem
    "forethought.core.errors": ("ForethoughtError",),
}
_API: dict[str, tuple[str, str]] = {  # name → (module, attribute path)
    name: (module, path or name)
    for module, entries in _MODULES.items() for name, _, path in (entry.partition("=") for entry in entries)
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    """Import ``name`` from its module on first use (PEP 562), then keep it here."""
    if name not in _API:
        raise AttributeError(f"module 'forethought' has no attribute {name!r}")
    module, path = _API[name]
    value: Any = importlib.import_module(module)
    for attribute in path.split("."):
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
