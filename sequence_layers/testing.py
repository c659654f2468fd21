"""Public test helpers: `random_sequence` and `verify_contract`.

PLACEHOLDER: a minimal step == layer check; the full contract checker replaces it.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from sequence_layers.sequence import Sequence
from sequence_layers.types import Constants, SequenceLayer
from sequence_layers.utils import step_by_step_static


def random_sequence(
    *dims: int, dtype: Any = jnp.float32, random_lengths: bool = True, seed: int = 0
) -> Sequence:
    rng = np.random.default_rng(seed)
    values = rng.normal(size=dims).astype(dtype)
    b, t = dims[0], dims[1]
    lengths = rng.integers(0, t + 1, size=b) if random_lengths else np.full(b, t)
    return Sequence.from_lengths(jnp.asarray(values), lengths).mask_invalid()


def verify_contract(
    layer: SequenceLayer,
    x: Sequence,
    *,
    training: bool = False,
    constants: Constants | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    **_: Any,
) -> Sequence:
    y_layer = layer.layer(x, training=training, constants=constants).mask_invalid()
    xp = x.pad_time(0, layer.input_latency, valid=False)
    for bps in (1, 2):
        y_step, _, _ = step_by_step_static(
            layer, xp, training=training, constants=constants, blocks_per_step=bps
        )
        y_step = y_step[:, layer.output_latency :].mask_invalid()
        n = min(y_step.shape[1], y_layer.shape[1])
        assert not np.any(np.asarray(y_step.mask[:, n:])), "extra step outputs are valid"
        np.testing.assert_array_equal(
            np.asarray(y_step.mask[:, :n]), np.asarray(y_layer.mask[:, :n])
        )
        np.testing.assert_allclose(
            np.asarray(y_step.values[:, :n]),
            np.asarray(y_layer.values[:, :n]),
            rtol=rtol,
            atol=atol,
        )
    return y_layer
