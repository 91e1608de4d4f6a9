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

# name → the module that defines it (an attribute path after ':' where the name is a method)
_API: dict[str, str] = {
    # experiments: a config dataclass in (its fields are the command's flags), a results object out
    "SyntheticConfig": "forethought.analyses.synthetic", "run_synthetic": "forethought.analyses.synthetic",
    "SyntheticResults": "forethought.analyses.synthetic",
    "PathStarConfig": "forethought.analyses.pathstar", "run_pathstar": "forethought.analyses.pathstar",
    "PathStarResults": "forethought.analyses.pathstar",
    "GapConfig": "forethought.analyses.gap", "run_gap": "forethought.analyses.gap",
    "GapResults": "forethought.analyses.gap",
    "ProbeConfig": "forethought.analyses.probe", "run_probe": "forethought.analyses.probe",
    "PrecacheConfig": "forethought.analyses.precache", "run_precache": "forethought.analyses.precache",
    "AcrossConfig": "forethought.analyses.across", "run_seeds": "forethought.analyses.across",
    "run_trend": "forethought.analyses.across",
    "CompareConfig": "forethought.analyses.compare", "run_compare": "forethought.analyses.compare",
    # the Jupyter object and its settings
    "Comparison": "forethought.analyses.compare", "ProbeSettings": "forethought.analyses.probing",
    "Probing": "forethought.analyses.engine",
    # training and checkpoints
    "LMTrainConfig": "forethought.models.lm", "train_lm": "forethought.models.lm",
    "TrainSettings": "forethought.models.train", "train": "forethought.models.train",
    "LMCheckpoint": "forethought.models.lm", "load_checkpoint": "forethought.models.lm:LMCheckpoint.load",
    "model_folder": "forethought.models.sources",
    "gpt2_config": "forethought.models.gpt2", "build_lm": "forethought.models.gpt2",
    "myopic": "forethought.models.myopic",
    # residual streams and the gradient reaching them
    "model_residuals": "forethought.probes.residuals", "bridge_residuals": "forethought.probes.residuals",
    "load_bridge": "forethought.probes.residuals", "hook_name": "forethought.probes.residuals",
    "future_gradient_share": "forethought.probes.gradients", "capture_residuals": "forethought.probes.residuals",
    # edits of the residual stream (a context manager over any supported family, or TransformerLens hooks)
    "intervene": "forethought.probes.interventions", "ProjectOut": "forethought.probes.interventions",
    "AddVector": "forethought.probes.interventions", "MeanAblate": "forethought.probes.interventions",
    "Patch": "forethought.probes.interventions",
    # one error type: every bad input is one line naming the problem
    "ForethoughtError": "forethought.core.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    """Import ``name`` from its module on first use (PEP 562), then keep it here."""
    if name not in _API:
        raise AttributeError(f"module 'forethought' has no attribute {name!r}")
    module, _, path = _API[name].partition(":")
    value: Any = importlib.import_module(module)
    for attribute in (path or name).split("."):
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
