"""BlockwiseDotProductSelfAttention."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import testing
from sequence_layers.attention import BlockwiseDotProductSelfAttention
from sequence_layers.sequence import Sequence
from sequence_layers.utils import step_by_step_static

B, T, D, H, U = 2, 12, 3, 2, 4


def bind(cfg: Any, x: Sequence, constants: dict | None = None) -> Any:
    layer = cfg.make()
    params = layer.init(
        jax.random.PRNGKey(0), x, training=False, constants=constants, method=layer.layer
    )
    return layer.bind(params)


def blockwise(**kw: Any) -> BlockwiseDotProductSelfAttention.Config:
    kw.setdefault("block_size", 3)
    kw.setdefault("num_heads", H)
    kw.setdefault("units_per_head", U)
    kw.setdefault("max_past_horizon_blocks", 1)
    return BlockwiseDotProductSelfAttention.Config(**kw)


@pytest.mark.parametrize(("past", "future"), [(1, 0), (1, 1), (0, 0)])
def test_contract(past: int, future: int) -> None:
    x = testing.random_sequence(B, T, D, seed=1)
    layer = bind(blockwise(max_past_horizon_blocks=past, max_future_horizon_blocks=future), x)
    assert layer.block_size == 3 and layer.input_latency == 3 * future
    rf = layer.receptive_field_per_step
    assert rf[0] == (-3 * past, 3 * future + 2) and rf[2] == (-3 * past - 2, 3 * future)
    y = testing.verify_contract(layer, x, training=False, rtol=1e-5, atol=1e-5)
    assert y.shape == (B, T, H, U)


def test_numerics_block_mask() -> None:
    """A query sees exactly the keys of its own and the previous block."""
    x = testing.random_sequence(B, 6, D, random_lengths=False, seed=2)
    layer = bind(blockwise(max_past_horizon_blocks=1), x)
    y = np.asarray(layer.layer(x, training=False).values)
    # Changing frame 5 (block 1) must not change outputs of block 0.
    x2 = Sequence(x.values.at[:, 5].add(10.0), x.mask)
    y2 = np.asarray(layer.layer(x2, training=False).values)
    np.testing.assert_allclose(y[:, :3], y2[:, :3], atol=1e-6)
    assert not np.allclose(y[:, 3], y2[:, 3])


def test_segment_ids_and_positions_from_constants() -> None:
    x = testing.random_sequence(B, T, D, random_lengths=False, seed=3)
    segments = Sequence.from_values(jnp.asarray(np.repeat([[0] * 6 + [1] * 6], B, 0), jnp.int32))
    positions = Sequence.from_values(jnp.tile(jnp.arange(T, dtype=jnp.int32), (B, 1)))
    constants = {"seg": segments, "pos": positions}
    cfg = blockwise(segment_ids_name="seg", position_name="pos", max_past_horizon_blocks=-1)
    layer = bind(cfg, x, constants)
    y = np.asarray(layer.layer(x, training=False, constants=constants).values)
    # Segment 1 is independent of segment 0.
    x2 = Sequence(x.values.at[:, 0].add(10.0), x.mask)
    y2 = np.asarray(layer.layer(x2, training=False, constants=constants).values)
    np.testing.assert_allclose(y[:, 6:], y2[:, 6:], atol=1e-6)


def test_state_shapes_fixed_and_unbounded_not_steppable() -> None:
    cfg = blockwise(max_past_horizon_blocks=2, max_future_horizon_blocks=1)
    shapes = []
    for t in (3, 12):
        x = testing.random_sequence(B, t, D, seed=4)
        layer = bind(cfg, x)
        _, state, _ = step_by_step_static(layer, x, training=False)
        shapes.append(jax.tree.map(lambda a: a.shape, state))
    assert shapes[0] == shapes[1]
    assert shapes[0][0]["keys"] == (B, 9, H, U)
    x = testing.random_sequence(B, 3, D, seed=4)
    layer = bind(blockwise(max_past_horizon_blocks=-1), x)
    state = layer.get_initial_state(B, x.channel_spec, training=False)
    with pytest.raises(ValueError, match=r"does not support step.*unbounded horizon"):
        layer.step(x, state, training=False)
