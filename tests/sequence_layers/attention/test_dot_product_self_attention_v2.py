"""DotProductSelfAttentionV2."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import testing
from sequence_layers.attention import DotProductSelfAttention, DotProductSelfAttentionV2
from sequence_layers.sequence import Sequence
from sequence_layers.utils import step_by_step_static

B, T, D, H, U = 2, 12, 3, 2, 4


def bind(cfg: Any, x: Sequence, constants: dict | None = None) -> Any:
    layer = cfg.make()
    params = layer.init(
        jax.random.PRNGKey(0), x, training=False, constants=constants, method=layer.layer
    )
    return layer.bind(params)


def v2(**kw: Any) -> DotProductSelfAttentionV2.Config:
    kw.setdefault("num_heads", H)
    kw.setdefault("units_per_head", U)
    kw.setdefault("max_past_horizon", 3)
    return DotProductSelfAttentionV2.Config(**kw)


@pytest.mark.parametrize(("past", "future"), [(3, 0), (2, 2)])
def test_contract(past: int, future: int) -> None:
    x = testing.random_sequence(B, T, D, seed=1)
    layer = bind(v2(max_past_horizon=past, max_future_horizon=future), x)
    assert layer.block_size == 1 and layer.input_latency == future
    assert layer.receptive_field_per_step == {0: (-past, future)}
    testing.verify_contract(layer, x, training=False, rtol=1e-5, atol=1e-5)


def test_matches_v1() -> None:
    x = testing.random_sequence(B, T, D, seed=2)
    layer = bind(v2(max_future_horizon=1), x)
    v1 = DotProductSelfAttention.Config(H, U, 3, 1).make().bind(layer.variables)
    np.testing.assert_allclose(
        layer.layer(x, training=False).mask_invalid().values,
        v1.layer(x, training=False).mask_invalid().values,
        rtol=1e-5,
        atol=1e-5,
    )


def test_ringbuffer() -> None:
    x = testing.random_sequence(B, T, D, seed=3)
    layer = bind(v2(use_kv_cache_ringbuffer=True, max_future_horizon=1), x)
    testing.verify_contract(layer, x, training=False, rtol=1e-5, atol=1e-5, test_2x_step=False)
    _, state, _ = step_by_step_static(layer, x, training=False)
    assert state[0]["keys"].shape == (B, 4, H, U)
    with pytest.raises(ValueError, match="exactly one frame"):
        layer.step(
            x[:, :2], layer.get_initial_state(B, x.channel_spec, training=False), training=False
        )


def test_positions_from_constants_restart_streams() -> None:
    """Positions that restart at 6 make the second half attend only to itself."""
    x = testing.random_sequence(B, T, D, random_lengths=False, seed=4)
    pos = jnp.tile(jnp.concatenate([jnp.arange(6), jnp.arange(100, 106)]), (B, 1)).astype(jnp.int32)
    constants = {"pos": Sequence.from_values(pos)}
    layer = bind(v2(position_name="pos"), x, constants)
    y = np.asarray(layer.layer(x, training=False, constants=constants).values)
    x2 = Sequence(x.values.at[:, 5].add(10.0), x.mask)
    y2 = np.asarray(layer.layer(x2, training=False, constants=constants).values)
    np.testing.assert_allclose(y[:, 6:], y2[:, 6:], atol=1e-6)


def test_config_validation() -> None:
    x = testing.random_sequence(B, T, D, seed=5)
    with pytest.raises(ValueError, match="both 0"):
        bind(v2(max_past_horizon=0), x)
