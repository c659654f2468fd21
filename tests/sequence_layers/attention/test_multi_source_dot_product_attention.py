"""MultiSourceDotProductAttention."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import testing
from sequence_layers.attention import DotProductAttention, MultiSourceDotProductAttention
from sequence_layers.sequence import Sequence

B, T, D, DS, H, U = 2, 9, 3, 5, 2, 4


def bind(cfg: Any, x: Sequence, constants: dict) -> Any:
    layer = cfg.make()
    params = layer.init(
        jax.random.PRNGKey(0), x, training=False, constants=constants, method=layer.layer
    )
    return layer.bind(params)


def sources() -> dict:
    return {
        "a": testing.random_sequence(B, 4, DS, seed=1),
        "b": testing.random_sequence(B, 6, DS, seed=2),
    }


def test_contract() -> None:
    x = testing.random_sequence(B, T, D, seed=3)
    constants = sources()
    cfg = MultiSourceDotProductAttention.Config(["a", "b"], H, U, num_kv_heads=1)
    assert cfg.source_names == ("a", "b")
    layer = bind(cfg, x, constants)
    kv, _, time_step = layer.get_initial_state(
        B, x.channel_spec, training=False, constants=constants
    )
    assert kv["keys"].shape == (B, 10, 1, U) and time_step.shape == (B,)
    y = testing.verify_contract(layer, x, training=False, constants=constants)
    assert y.shape == (B, T, H, U)


def test_single_source_matches_dot_product_attention() -> None:
    x = testing.random_sequence(B, T, D, seed=4)
    constants = sources()
    layer = bind(MultiSourceDotProductAttention.Config("a", H, U), x, constants)
    cross = DotProductAttention.Config("a", H, U).make().bind(layer.variables)
    np.testing.assert_allclose(
        layer.layer(x, training=False, constants=constants).mask_invalid().values,
        cross.layer(x, training=False, constants=constants).mask_invalid().values,
        atol=1e-6,
    )


def test_segment_mask() -> None:
    x = testing.random_sequence(B, 2, D, random_lengths=False, seed=5)
    src = testing.random_sequence(B, 4, DS, random_lengths=False, seed=6)
    constants = {
        "a": src,
        "qseg": Sequence.from_values(jnp.array([[0, 1]] * B, jnp.int32)),
        "sseg": Sequence.from_values(jnp.array([[0, 0, 1, 1]] * B, jnp.int32)),
    }
    cfg = MultiSourceDotProductAttention.Config(
        "a", H, U, query_segment_ids_name="qseg", source_segment_ids_names="sseg"
    )
    layer = bind(cfg, x, constants)
    y = np.asarray(layer.layer(x, training=False, constants=constants).values)
    constants2 = dict(constants, a=Sequence(src.values.at[:, 3].add(5.0), src.mask))
    y2 = np.asarray(layer.layer(x, training=False, constants=constants2).values)
    np.testing.assert_allclose(y[:, 0], y2[:, 0], atol=1e-6)  # segment 0 ignores frame 3
    assert not np.allclose(y[:, 1], y2[:, 1])


def test_errors() -> None:
    x = testing.random_sequence(B, T, D, seed=7)
    bad = {"a": testing.random_sequence(B, 4, DS, seed=1), "b": testing.random_sequence(B, 4, 2)}
    with pytest.raises(ValueError, match="same channel shape"):
        bind(MultiSourceDotProductAttention.Config(("a", "b"), H, U), x, bad)
    with pytest.raises(ValueError, match="source_names"):
        bind(MultiSourceDotProductAttention.Config(("a", ""), H, U), x, bad)
