"""Linear probes (scikit-learn): ridge regression for continuous targets, multinomial logistic regression for
(few) classes. The vocabulary-scale torch probes (kinds softmax, topk, lens) are in :mod:`probes.future`.

Both take plain arrays (features [n, d]); which examples go into ``fit`` and which into ``score`` is the
caller's business — :mod:`probes.fit` splits by whole sequences, never by positions of one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from forethought.core.errors import ForethoughtError
from forethought.probes.metrics import Estimate, mean_scores, r2_scores


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
class LogisticProbe:
    """Affine map features → class logits: multinomial logistic regression (sklearn, L-BFGS) on
    standardised features, for small class counts (a vocabulary-sized probe needs minibatches on a GPU).

    ``l2`` penalises the weights against the *mean* cross-entropy: l2 · ‖W‖² + mean CE.
    """

    n_classes: int
    l2: float = 1e-3
    max_iter: int = 500
    _model: Pipeline = field(init=False, repr=False)

    def fit(self, features: np.ndarray, labels: np.ndarray) -> LogisticProbe:
        """features [n, d], integer labels [n] in 0 … n_classes − 1."""
        _check_features(features, labels)
        if labels.min() < 0 or labels.max() >= self.n_classes:
            raise ForethoughtError(f"labels must lie in 0 … {self.n_classes - 1}")
        regression = LogisticRegression(C=1 / (2 * self.l2 * len(labels)), max_iter=self.max_iter)
        self._model = make_pipeline(StandardScaler(), regression).fit(features.astype(np.float64), labels)
        return self

    def logits(self, features: np.ndarray) -> np.ndarray:
        """[n, d] → [n, n_classes] (classes never seen in training get −inf)."""
        seen = self._model.predict_log_proba(features.astype(np.float64))
        logits = np.full((len(features), self.n_classes), -np.inf)
        logits[:, self._model.classes_] = seen
        return logits

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.logits(features).argmax(-1)

    def score(self, features: np.ndarray, labels: np.ndarray, sequence_ids: np.ndarray) -> dict[str, Estimate]:
        """Held-out top-1 accuracy and cross-entropy (nats; probabilities floored at 1e-12), with 95 %
        intervals over sequences."""
        log_probs = np.maximum(self.logits(features), np.log(1e-12))
        hits = (log_probs.argmax(-1) == labels).astype(np.float64)
        losses = -log_probs[np.arange(len(labels)), labels]
        accuracy, loss = mean_scores(np.stack([hits, losses], axis=1), sequence_ids)
        return {"accuracy": accuracy, "cross_entropy": loss}
