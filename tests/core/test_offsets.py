"""τ alignment: at_offset against the definition, entry by entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forethought.core.offsets import at_offset


@pytest.mark.parametrize("as_tensor", [False, True])
def test_every_entry_is_the_value_tau_positions_away(as_tensor):
    values = np.arange(3 * 7 * 2, dtype=np.float64).reshape(3, 7, 2)  # [batch, T, feature]
    for tau in range(-8, 9):
        for n_positions in range(8):
            shifted = at_offset(torch.from_numpy(values) if as_tensor else values, tau, n_positions, fill=np.nan)
            shifted = np.asarray(shifted)
            assert shifted.shape == (3, n_positions, 2)
            for t in range(n_positions):
                expected = values[:, t + tau] if 0 <= t + tau < 7 else np.full((3, 2), np.nan)
                np.testing.assert_array_equal(shifted[:, t], expected)


def test_without_fill_it_is_a_view_and_reaching_outside_is_refused():
    tokens = np.arange(20).reshape(2, 10)
    ahead = at_offset(tokens, 3, n_positions=7)  # the targets of τ = 3 at t < T − 3
    assert np.shares_memory(ahead, tokens) and (ahead == tokens[:, 3:]).all()
    assert (at_offset(tokens, 0, 4) == tokens[:, :4]).all()
    with pytest.raises(ValueError, match="τ = 4 reaches outside sequences of 10 from positions 0 … 6"):
        at_offset(tokens, 4, n_positions=7)
    with pytest.raises(ValueError, match="τ = -1 reaches outside"):
        at_offset(tokens, -1)
    with pytest.raises(ValueError, match="11 probed positions do not fit in sequences of 10"):
        at_offset(tokens, 0, 11)
