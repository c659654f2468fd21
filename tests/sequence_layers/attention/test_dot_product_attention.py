"""DotProductAttention (cross attention to constants[source_name])."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import testing
from sequence_layers.attention import (
    CombinedQueryKeyValueProjection,
    CrossAttentionEmits,
    DotProductAttention,
    QueryAndSharedKeyValueProjection,
    SeparateQueryKeyValueProjection,
)
from sequence_layers.sequence import Sequence
from sequence_layers.utils import step_by_step_static

B, T, S, D, DS, H, U = 2, 10, 7, 3, 5, 2, 4


def bind(cfg: Any, x: Sequence, constants: dict, seed: int = 0) -> Any:
    layer = cfg.make()
    params = layer.init(
        jax.random.PRNGKey(seed), x, training=False, constants=constants, method=layer.layer
    )
    return layer.bind(params)


def cross(**kw: Any) -> DotProductAttention.Config:
    kw.setdefault("source_name", "src")
    kw.setdefault("num_heads", H)
    kw.setdefault("units_per_head", U)
    return DotProductAttention.Config(**kw)


def source(seed: int = 1) -> Sequence:
    return testing.random_sequence(B, S, DS, seed=seed)


@pytest.mark.parametrize(
    "projection",
    [None, SeparateQueryKeyValueProjection(), QueryAndSharedKeyValueProjection()],
    ids=["q_and_kv", "separate", "shared_kv"],
)
def test_contract(projection: Any) -> None:
    x = testing.random_sequence(B, T, D, seed=2)
    constants = {"src": source()}
    kw = {} if projection is None else {"input_projection": projection}
    layer = bind(cross(use_bias=True, **kw), x, constants)
    assert layer.receptive_field_per_step == {0: (0, 0)}
    y = testing.verify_contract(layer, x, training=False, constants=constants)
    assert y.shape == (B, T, H, U)


def test_param_tree_mirrors_reference() -> None:
    x = testing.random_sequence(B, T, D, seed=2)
    layer = bind(cross(), x, {"src": source()})
    shapes = jax.tree.map(lambda a: a.shape, layer.variables["params"])
    assert shapes == {
        "query_projection": {"kernel": (D, H, U)},
        "key_value_projection": {"kernel": (DS, 2, H, U)},
    }


def test_recompute_kv_per_step_and_sinks() -> None:
    x = testing.random_sequence(B, T, D, seed=3)
    constants = {"src": source()}
    layer = bind(cross(recompute_kv_per_step=True, num_sink_embeddings=1), x, constants)
    state = layer.get_initial_state(B, x.channel_spec, training=False, constants=constants)
    assert len(state) == 2 and state[1].shape == (B,)
    testing.verify_contract(layer, x, training=False, constants=constants)


def test_cached_source_state() -> None:
    x = testing.random_sequence(B, T, D, seed=4)
    constants = {"src": source()}
    layer = bind(cross(), x, constants)
    keys, values, mask, _, _ = layer.get_initial_state(
        B, x.channel_spec, training=False, constants=constants
    )
    assert keys.shape == (B, S, H, U) and values.shape == (B, S, H, U)
    np.testing.assert_array_equal(mask, constants["src"].mask)
    _, state, _ = step_by_step_static(layer, x, training=False, constants=constants)
    np.testing.assert_array_equal(state[4], [T, T])


def test_numerics_and_emits() -> None:
    x = testing.random_sequence(B, T, D, seed=5)
    src = Sequence.from_lengths(source().values, [S, 3]).mask_invalid()
    layer = bind(cross(), x, {"src": src})
    y, emits = layer.layer_with_emits(x, training=False, constants={"src": src})
    params = layer.variables["params"]
    wq = np.asarray(params["query_projection"]["kernel"])
    wkv = np.asarray(params["key_value_projection"]["kernel"])
    q = np.einsum("btd,dhu->bthu", np.asarray(x.values), wq) / np.sqrt(U)
    k = np.einsum("bsd,dhu->bshu", np.asarray(src.values), wkv[:, 0])
    v = np.einsum("bsd,dhu->bshu", np.asarray(src.values), wkv[:, 1])
    logits = np.einsum("bthu,bshu->bhts", q, k)
    logits = np.where(np.asarray(src.mask)[:, None, None, :], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.einsum("bhts,bshu->bthu", p, v)
    valid = np.asarray(x.mask)
    np.testing.assert_allclose(np.asarray(y.values)[valid], expected[valid], atol=1e-5)
    assert isinstance(emits, CrossAttentionEmits)
    probs = np.asarray(emits.probabilities_by_source["src"].values)
    np.testing.assert_allclose(probs.sum(-1)[valid], 1.0, atol=1e-5)
    assert np.all(probs[1, :, :, 3:] == 0)


def test_empty_source_row_gives_zeros_not_nan() -> None:
    x = testing.random_sequence(B, T, D, random_lengths=False, seed=6)
    src = Sequence.from_lengths(source().values, [S, 0]).mask_invalid(jnp.nan)
    layer = bind(cross(), x, {"src": src})
    y = layer.layer(x, training=False, constants={"src": src})
    assert np.all(np.isfinite(np.asarray(y.values)))
    assert np.all(np.asarray(y.values[1]) == 0)


def test_errors() -> None:
    x = testing.random_sequence(B, T, D, seed=7)
    with pytest.raises(ValueError, match="constants\\['src'\\]"):
        bind(cross(), x, {})
    with pytest.raises(ValueError, match="cross attention"):
        bind(cross(input_projection=CombinedQueryKeyValueProjection()), x, {"src": source()})
    with pytest.raises(ValueError, match="source_name"):
        bind(cross(source_name=""), x, {"src": source()})
