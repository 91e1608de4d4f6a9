"""Linear probes: ridge regression for continuous targets, softmax regression for classes.

Both take plain arrays (features [n, d]); which examples go into ``fit`` and which into ``score`` is the
caller's business — :mod:`probes.fit` splits by whole sequences, never by positions of one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.linear_model import Ridge
from torch.nn.functional import cross_entropy

from models.errors import ForethoughtError
from probes.metrics import Estimate, mean_scores, r2_scores


def _check_features(features: np.ndarray, targets: np.ndarray) -> None:
    if features.ndim != 2:
        raise ForethoughtError(f"features must be [n, d], got shape {features.shape}")
    if len(targets) != len(features):
        raise ForethoughtError(f"{len(features)} feature rows but {len(targets)} targets")
    if not np.isfinite(features).all():
        raise ForethoughtError("features contain NaN or inf")


@dataclass
class RidgeProbe:
    """Affine map features → continuous targets, fitted by ridge regression (sklearn, float64).

    ``alpha`` is the L2 penalty on the weights (not the bias); the paper used 1e-4.
    """

    alpha: float = 1e-4
    _ridge: Ridge = field(init=False, repr=False)

    def fit(self, features: np.ndarray, targets: np.ndarray) -> RidgeProbe:
        """features [n, d], targets [n] or [n, k] (k targets fitted at once)."""
        _check_features(features, targets)
        self._ridge = Ridge(alpha=self.alpha).fit(features.astype(np.float64), targets.astype(np.float64))
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self._ridge.predict(features.astype(np.float64))

    def score(self, features: np.ndarray, targets: np.ndarray, sequence_ids: np.ndarray) -> list[Estimate]:
        """Held-out R² per target column, with 95 % intervals over the sequences in ``sequence_ids``."""
        return r2_scores(targets, self.predict(features), sequence_ids)


@dataclass
class SoftmaxProbe:
    """Affine map features → class logits, fitted by L2-penalised cross-entropy (full-batch L-BFGS, torch).

    Features are standardised with the training mean and std; ``l2`` penalises the weights on that scale.
    """

    n_classes: int
    l2: float = 1e-4
    max_iter: int = 200
    _mean: torch.Tensor = field(init=False, repr=False)
    _std: torch.Tensor = field(init=False, repr=False)
    _weight: torch.Tensor = field(init=False, repr=False)  # [d, n_classes]
    _bias: torch.Tensor = field(init=False, repr=False)  # [n_classes]

    def fit(self, features: np.ndarray, labels: np.ndarray) -> SoftmaxProbe:
        """features [n, d], integer labels [n] in 0 … n_classes − 1."""
        _check_features(features, labels)
        if labels.min() < 0 or labels.max() >= self.n_classes:
            raise ForethoughtError(f"labels must lie in 0 … {self.n_classes - 1}")
        x = torch.as_tensor(features, dtype=torch.float64)
        y = torch.as_tensor(labels, dtype=torch.long)
        self._mean, self._std = x.mean(0), x.std(0).clamp_min(1e-12)
        x = (x - self._mean) / self._std
        weight = torch.zeros(x.shape[1], self.n_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(self.n_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias], max_iter=self.max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9
        )

        def objective() -> torch.Tensor:
            optimizer.zero_grad()
            loss = cross_entropy(x @ weight + bias, y) + self.l2 * weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(objective)
        self._weight, self._bias = weight.detach(), bias.detach()
        return self

    def logits(self, features: np.ndarray) -> np.ndarray:
        """[n, d] → [n, n_classes]."""
        x = (torch.as_tensor(features, dtype=torch.float64) - self._mean) / self._std
        return (x @ self._weight + self._bias).numpy()

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.logits(features).argmax(-1)

    def score(self, features: np.ndarray, labels: np.ndarray, sequence_ids: np.ndarray) -> dict[str, Estimate]:
        """Held-out top-1 accuracy and cross-entropy (nats), with 95 % intervals over sequences."""
        logits = torch.as_tensor(self.logits(features))
        labels = torch.as_tensor(labels, dtype=torch.long)
        hits = (logits.argmax(-1) == labels).double().numpy()
        losses = cross_entropy(logits, labels, reduction="none").numpy()
        accuracy, loss = mean_scores(np.stack([hits, losses], axis=1), sequence_ids)
        return {"accuracy": accuracy, "cross_entropy": loss}
