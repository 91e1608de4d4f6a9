"""The synthetic pre-caching task of Wu, Morris & Levine (2024), §2.

    x_t ~ N(0, 1),  z_t ~ Bernoulli(p),
    y_t = z_t · Σ_{i=1..n_terms} sin(freq · x_{t−i}) + (1 − z_t) · x_t      (terms before t = 0 are 0)

Predicting y_t needs sin(freq · x_{t−i}) of *past* inputs, never of the current one: a model that computes
sin(freq · x_t) at position t does it for the benefit of later positions (pre-caching). A myopic model has
no gradient telling it to, so on the sine part it does no better than predicting 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.functional import huber_loss, pad

from forethought.core.errors import ForethoughtError
from forethought.core.offsets import at_offset


@dataclass(frozen=True)
class SyntheticTask:
    """Sequences of (x_t, z_t) with targets y_t; fresh samples every call (no epochs)."""

    p: float = 1.0
    n_terms: int = 10
    freq: float = 10.0
    seq_len: int = 64

    in_dim = 2  # (x_t, z_t)
    out_dim = 1  # y_t

    def __post_init__(self):
        if not 0.0 <= self.p <= 1.0:
            raise ForethoughtError(f"p must lie in [0, 1], got {self.p}")
        if self.seq_len < 2:
            raise ForethoughtError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.n_terms < 1:
            raise ForethoughtError(f"n_terms must be at least 1, got {self.n_terms}")

    def sample(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs [batch, seq_len, 2] = (x_t, z_t) and targets [batch, seq_len], on the generator's device."""
        shape = (batch_size, self.seq_len)
        device = generator.device
        x = torch.randn(shape, generator=generator, device=device)
        z = (torch.rand(shape, generator=generator, device=device) < self.p).float()
        past_sines = self.lagged_sum(torch.sin(self.freq * x))
        targets = z * past_sines + (1 - z) * x
        return torch.stack([x, z], dim=-1), targets

    def lagged_sum(self, values: torch.Tensor) -> torch.Tensor:
        """[batch, seq] → Σ_{i=1..n_terms} values[:, t−i] (zeros before the first position)."""
        padded = pad(values, (self.n_terms, 0))  # [batch, n_terms + seq]
        windows = padded.unfold(1, self.n_terms, 1)[:, : values.shape[1]]  # [batch, seq, n_terms]
        return windows.sum(-1)

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean Huber loss (δ = 1) of the model's predictions, as in the paper."""
        predictions = model(inputs).squeeze(-1).float()  # [batch, seq]
        return huber_loss(predictions, targets)

    @staticmethod
    def trivial_loss(targets: torch.Tensor) -> torch.Tensor:
        """Huber loss of always predicting 0: 1.257 at p = 1 with the paper's defaults."""
        return huber_loss(torch.zeros_like(targets), targets)

    def features(self, inputs: torch.Tensor, lookback: int) -> dict[str, torch.Tensor]:
        """Probe targets at each position t: sin(freq · x_{t−j}) and x_{t−j} for j = ``lookback``.

        Returns {name: [batch, seq]}; positions t < j (no such input) are NaN.
        """
        shifted = at_offset(inputs[..., 0], -lookback, fill=float("nan"))  # x_{t−j}: τ = −j
        return {"sin": torch.sin(self.freq * shifted), "x": shifted}

    def describe(self) -> str:
        return (
            f"synthetic pre-caching task: p={self.p}, n_terms={self.n_terms}, "
            f"freq={self.freq}, seq_len={self.seq_len}"
        )
