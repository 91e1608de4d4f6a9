"""Linear concept erasure at a chosen rank, and its control: what the causal tests remove from h[l, t].

LEACE (Belrose et al. 2023, "LEACE: Perfect linear concept erasure in closed form") removes from h everything a
linear classifier can read about a concept z: whiten h (W = Σ_hh^(-1/2)), take the column space of W·Σ_hz, and
erase it there,

    h ← h − W⁺ U Uᵀ W (h − μ)          U [d, r]: orthonormal, the top-r left singular vectors of W Σ_hz.

At full rank (r = rank Σ_hz ≤ classes − 1) no linear probe does better than a constant; a smaller r removes the
r most decodable directions (the rank sweep). The **control** erases r random orthonormal directions drawn in the
same whitened space: the same rank and the same whitened variance removed (r), so a bigger effect of the concept
edit is not a bigger edit. Its raw variance removed is reported beside the concept edit's
(:meth:`ConceptEraser.removed_variance`).

The statistics (running means, covariance with the RMT shrinkage of Ledoit-Wolf type, cross-covariance) come
from ``concept-erasure``'s :class:`LeaceFitter`, the authors' own package; the rank truncation and the control
are not in it and are written here. Never erase along a probe's weight vector: it is a filter, not the feature's
direction, and projecting it out removes almost nothing the model uses (issue 27).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from concept_erasure import LeaceFitter

from forethought.core.errors import ForethoughtError
from forethought.probes.interventions import Erase, Positions


@dataclass(frozen=True)
class ConceptEraser:
    """h ↦ h − ((h − mean) · rightᵀ) · leftᵀ: a rank-``rank`` affine erasure (float64 tensors)."""

    mean: torch.Tensor  # [d]
    left: torch.Tensor  # [d, r]  W⁺ U
    right: torch.Tensor  # [r, d]  Uᵀ W

    @property
    def rank(self) -> int:
        return self.right.shape[0]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., d] → erased h, in h's dtype."""
        return _erase(h, self)

    def at(self, layer: int | str, positions: Positions = None) -> Erase:
        """This erasure as an edit of h[layer] at ``positions`` (:func:`probes.interventions.intervene`)."""
        return Erase(layer, positions, mean=self.mean, left=self.left, right=self.right)

    def removed_variance(self, h: torch.Tensor) -> float:
        """Mean squared norm of what the erasure takes from the rows of ``h`` [n, d] (raw, unwhitened units)."""
        h = torch.as_tensor(h, dtype=torch.float64)
        return float(((h - _erase(h, self)) ** 2).sum(-1).mean())


def _erase(h: torch.Tensor, eraser: ConceptEraser) -> torch.Tensor:
    return eraser.at(0).edited(torch.as_tensor(h), torch.arange(0)).to(torch.as_tensor(h).dtype)


@dataclass(frozen=True)
class ErasureFit:
    """The whitened directions of a concept in one residual layer, from which erasers of any rank are cut."""

    mean: torch.Tensor  # [d]
    whiten: torch.Tensor  # [d, d]  W = Σ^(-1/2) on Σ's range (0 off it)
    unwhiten: torch.Tensor  # [d, d]  W⁺ = Σ^(1/2)
    directions: torch.Tensor  # [d, k]  left singular vectors of W Σ_hz, by decreasing singular value
    singular_values: torch.Tensor  # [k]
    kept: torch.Tensor | None = None  # [d, j]  whitened directions no eraser of this fit touches (:meth:`beyond`)

    @classmethod
    def from_samples(cls, h: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, n_classes: int,
                     batch_rows: int = 8192, shrinkage: bool = True) -> ErasureFit:
        """Fit on residuals ``h`` [n, d] and integer ``labels`` [n] in 0 … n_classes − 1 (the concept, one-hot)."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
            raise ForethoughtError(f"erasure needs labels in 0 … {n_classes - 1}")
        return cls._fit(h, labels, n_classes, lambda z: torch.nn.functional.one_hot(z, n_classes), batch_rows,
                        shrinkage)

    @classmethod
    def from_values(cls, h: np.ndarray | torch.Tensor, values: np.ndarray | torch.Tensor, batch_rows: int = 8192,
                    shrinkage: bool = True) -> ErasureFit:
        """Fit on residuals ``h`` [n, d] and a continuous concept ``values`` [n] or [n, k] (e.g. sin(freq · x_t))."""
        values = torch.as_tensor(values, dtype=torch.float64)
        values = values.reshape(len(values), -1)
        return cls._fit(h, values, values.shape[1], lambda z: z, batch_rows, shrinkage)

    @classmethod
    def _fit(cls, h: np.ndarray | torch.Tensor, concept: torch.Tensor, width: int,
             encode: Callable[[torch.Tensor], torch.Tensor], batch_rows: int, shrinkage: bool) -> ErasureFit:
        """LEACE's statistics over rows of ``h`` and ``encode(concept rows)`` [rows, width], then the whitened
        directions of the concept, by decreasing singular value."""
        h = torch.as_tensor(h)
        if h.dim() != 2 or len(concept) != len(h) or len(h) < 2:
            raise ForethoughtError(f"erasure needs residuals [n ≥ 2, d] and one concept value per row, got "
                                   f"{tuple(h.shape)} and {len(concept)}")
        fitter = LeaceFitter(h.shape[1], width, dtype=torch.float64, shrinkage=shrinkage)
        for start in range(0, len(h), batch_rows):
            rows = slice(start, start + batch_rows)
            fitter.update(h[rows].to(torch.float64), encode(concept[rows]).to(torch.float64))
        eigenvalues, vectors = torch.linalg.eigh(fitter.sigma_xx)
        kept = eigenvalues > eigenvalues[-1] * len(eigenvalues) * torch.finfo(eigenvalues.dtype).eps  # as pinv
        eigenvalues = eigenvalues.clamp_min(0)
        whiten = vectors * torch.where(kept, eigenvalues.rsqrt(), 0.0) @ vectors.T
        unwhiten = vectors * torch.where(kept, eigenvalues.sqrt(), 0.0) @ vectors.T
        u, s, _ = torch.linalg.svd(whiten @ fitter.sigma_xz, full_matrices=False)
        informative = s > s.max() * 1e-6 if s.numel() and s.max() > 0 else s > 0
        return cls(fitter.mean_x.clone(), whiten, unwhiten, u[:, informative], s[informative])

    def beyond(self, other: ErasureFit) -> ErasureFit:
        """What h holds about this concept beyond ``other`` (both fitted on the same rows): this concept's whitened
        directions with ``other``'s projected out, W Σ_hz ↦ (I − U_o U_oᵀ) W Σ_hz, re-decomposed. An eraser cut from
        it leaves every whitened coordinate along U_o as it was, so ``other``'s best linear readout of h,
        Σ_zo,h Σ_hh⁻¹ (h − μ), is exactly unchanged; its random controls avoid U_o too. Used to ask whether x[t+2]'s
        information matters apart from the next token's, with which it is correlated."""
        if not (torch.equal(self.mean, other.mean) and torch.equal(self.whiten, other.whiten)):
            raise ForethoughtError("an erasure beyond another concept needs both fitted on the same residual rows")
        kept = other.directions if self.kept is None else torch.cat([self.kept, other.directions], dim=1)
        kept = torch.linalg.qr(kept)[0] if kept.shape[1] else kept
        scaled = self.directions * self.singular_values  # W Σ_hz up to an orthogonal factor on the right
        u, s, _ = torch.linalg.svd(scaled - kept @ (kept.T @ scaled), full_matrices=False)
        informative = s > self.singular_values.max() * 1e-6 if self.singular_values.numel() else s > 0
        return replace(self, directions=u[:, informative], singular_values=s[informative], kept=kept)

    @property
    def max_rank(self) -> int:
        """The rank of full erasure: the number of whitened directions that carry the concept."""
        return self.directions.shape[1]

    def eraser(self, rank: int | None = None) -> ConceptEraser:
        """Erase the ``rank`` most decodable whitened directions (None: all, LEACE itself)."""
        rank = self.max_rank if rank is None else self._checked(rank)
        return self._erasing(self.directions[:, :rank])

    def random_eraser(self, rank: int, seed: int, like: ConceptEraser | None = None) -> ConceptEraser:
        """The control: ``rank`` random orthonormal directions in the whitened space (on Σ's range, off :attr:`kept`),
        drawn from ``seed`` alone — the same rank and whitened variance (``rank``) as :meth:`eraser`, and nothing of the
        concept. With ``like`` (the concept's eraser), the draw is tilted towards Σ's high- or low-variance
        directions, U = orth(Σ^(a/2) G) with the same Gaussian G, a found by bisection, until the *raw* variance it
        removes, tr(Uᵀ Σ U), equals ``like``'s: LEACE's directions carry the residual's large-variance token
        identity, and an isotropic control would remove several times less of h."""
        rank = self._checked(rank)
        gaussian = torch.randn(len(self.mean), rank, generator=torch.Generator().manual_seed(seed),
                               dtype=torch.float64)
        eigenvalues, vectors = torch.linalg.eigh(self.unwhiten @ self.unwhiten)  # Σ, on its range
        on_range = eigenvalues > eigenvalues.max() * len(eigenvalues) * torch.finfo(eigenvalues.dtype).eps
        eigenvalues = torch.where(on_range, eigenvalues, 0.0)
        drawn = vectors.T @ gaussian  # G in Σ's eigenbasis

        def basis(tilt: float) -> torch.Tensor:  # [d, rank], orthonormal, on Σ's range (and off self.kept)
            scale = torch.where(on_range, eigenvalues.clamp_min(1e-300) ** (tilt / 2), 0.0)
            tilted = vectors @ (scale[:, None] * drawn)
            if self.kept is not None:
                tilted = tilted - self.kept @ (self.kept.T @ tilted)
            return torch.linalg.qr(tilted)[0]

        def raw(u: torch.Tensor) -> float:  # the raw variance an erasure of whitened directions u removes
            return float(((u.T @ vectors) ** 2 @ eigenvalues).sum())

        if like is None or rank == 0:
            return self._erasing(basis(0.0))
        target = raw(self.whiten @ like.left)  # W W⁺ U = U on the range: the concept's whitened directions
        low, high = -8.0, 8.0
        for _ in range(60):  # raw(basis(a)) grows with a: from the low-variance directions to the high ones
            middle = (low + high) / 2
            low, high = (middle, high) if raw(basis(middle)) < target else (low, middle)
        return self._erasing(basis((low + high) / 2))

    def _checked(self, rank: int) -> int:
        """``rank``, capped at :attr:`max_rank` (beyond it LEACE has nothing left to erase; the control follows)."""
        if not 0 <= rank <= len(self.mean):
            raise ForethoughtError(f"erasure rank {rank} is outside 0 … {len(self.mean)} (the residual width)")
        return min(rank, self.max_rank)

    def _erasing(self, basis: torch.Tensor) -> ConceptEraser:
        return ConceptEraser(self.mean, self.unwhiten @ basis, basis.T @ self.whiten)


# ---- checks of an erasure: what a probe fitted afresh on erased rows still reads


def linear_r2(h: np.ndarray, labels: np.ndarray, h_test: np.ndarray, labels_test: np.ndarray,
               ridge: float = 1e-3) -> float:
    """R² on the test rows of the ridge regression of the one-hot concept on h (with intercept), fitted on the
    training rows: the linear probe LEACE provably defeats at full rank (it then predicts the class frequencies,
    R² ≤ 0). Top-1 would not do: where one class ("other") is most rows, every probe's argmax is that class."""
    x, x_test = (torch.as_tensor(rows, dtype=torch.float64) for rows in (h, h_test))
    y, y_test = (torch.as_tensor(rows, dtype=torch.long) for rows in (labels, labels_test))
    n_classes = int(max(y.max(), y_test.max())) + 1
    mean = x.mean(0)
    x, x_test = x - mean, x_test - mean
    cross = torch.zeros(n_classes, x.shape[1], dtype=torch.float64).index_add_(0, y, x).T  # Xᵀ Y [d, classes]
    gram = x.T @ x
    weights = torch.linalg.solve(gram + ridge * gram.trace() / len(gram) * torch.eye(len(gram), dtype=gram.dtype),
                                 cross)
    predicted = x_test @ weights + torch.bincount(y, minlength=n_classes) / len(y)  # [m, classes]
    truth = torch.nn.functional.one_hot(y_test, n_classes).to(torch.float64)
    return float(1 - ((truth - predicted) ** 2).sum() / ((truth - truth.mean(0)) ** 2).sum())


def mlp_gain(h: np.ndarray, labels: np.ndarray, h_test: np.ndarray, labels_test: np.ndarray, seed: int,
             hidden: int = 256, steps: int = 600, batch_rows: int = 512) -> float:
    """Nats per row a one-hidden-layer probe (GELU, ``hidden`` wide; up to ``steps`` Adam steps on standardised h,
    seeded, stopped at its best loss on a tenth of the training rows held out) saves on the test rows over
    predicting the training class frequencies: what survives a linear erasure nonlinearly (≈ 0: nothing a probe
    of this size reads; below 0: it learned nothing that carries to the test rows)."""
    x, x_test = (torch.as_tensor(rows, dtype=torch.float32) for rows in (h, h_test))
    y, y_test = (torch.as_tensor(rows, dtype=torch.long) for rows in (labels, labels_test))
    n_classes = int(max(y.max(), y_test.max())) + 1
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    x, x_test = (x - mean) / scale, (x_test - mean) / scale
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    held, fit = order[: max(1, len(x) // 10)], order[max(1, len(x) // 10):]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(),
                                    torch.nn.Linear(hidden, n_classes))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3)
    best, best_state = float("inf"), copy.deepcopy(probe.state_dict())
    for step in range(steps):
        rows = fit[torch.randint(0, len(fit), (min(batch_rows, len(fit)),), generator=generator)]
        optimizer.zero_grad()
        with torch.enable_grad():
            torch.nn.functional.cross_entropy(probe(x[rows]), y[rows]).backward()
        optimizer.step()
        if step % 25 == 24:
            with torch.no_grad():
                loss = float(torch.nn.functional.cross_entropy(probe(x[held]), y[held]))
            if loss < best:
                best, best_state = loss, copy.deepcopy(probe.state_dict())
    probe.load_state_dict(best_state)
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(probe(x_test), y_test))
    frequencies = torch.bincount(y, minlength=n_classes).double().add(0.5) / (len(y) + 0.5 * n_classes)
    return float(-frequencies.log()[y_test].mean()) - loss
