"""DotProductSelfAttention: contract, KV cache, ring buffer, numerics."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import testing
from sequence_layers.attention import (
    DotProductSelfAttention,
    QueryAndKeyValueProjection,
    SelfAttentionEmits,
    SeparateQueryKeyValueProjection,
)
from sequence_layers.position import ApplyRotaryPositionalEncoding
from sequence_layers.sequence import Sequence
from sequence_layers.utils import step_by_step_static

B, T, D, H, U = 2, 12, 3, 2, 4


def bind(cfg: Any, x: Sequence, seed: int = 0) -> Any:
    layer = cfg.make()
    params = layer.init(jax.random.PRNGKey(seed), x, training=False, method=layer.layer)
    return layer.bind(params)


def dsa(**kw: Any) -> DotProductSelfAttention.Config:
    kw.setdefault("num_heads", H)
    kw.setdefault("units_per_head", U)
    kw.setdefault("max_past_horizon", 3)
    return DotProductSelfAttention.Config(**kw)


@pytest.mark.parametrize(
    ("past", "future"), [(3, 0), (0, 2), (T + 4, 3)], ids=["past", "future", "both_long"]
)
def test_contract(past: int, future: int) -> None:
    x = testing.random_sequence(B, T, D, seed=1)
    layer = bind(dsa(max_past_horizon=past, max_future_horizon=future), x)
    assert layer.input_latency == future and layer.output_latency == future
    assert layer.receptive_field_per_step == {0: (-past, future)}
    y = testing.verify_contract(layer, x, training=False, rtol=1e-5, atol=1e-5)
    assert y.shape == (B, T, H, U)
    np.testing.assert_array_equal(np.asarray(y.mask), np.asarray(x.mask))


def test_contract_gqa_sinks_softcap_per_dim_scale() -> None:
    x = testing.random_sequence(B, T, D, seed=2)
    cfg = dsa(
        num_heads=4,
        num_kv_heads=2,
        max_future_horizon=1,
        input_projection=SeparateQueryKeyValueProjection(),
        use_bias=True,
        attention_logits_soft_cap=5.0,
        per_dim_scale=True,
        per_dim_key_scale=True,
        num_sink_embeddings=2,
    )
    layer = bind(cfg, x)
    params = layer.variables["params"]
    assert params["query_projection"]["kernel"].shape == (D, 4, U)
    assert params["key_projection"]["kernel"].shape == (D, 2, U)
    assert params["sink_value_embeddings"].shape == (2, 2, U)
    testing.verify_contract(layer, x, training=False, rtol=1e-5, atol=1e-5)


def test_contract_sink_scalars_rope_networks_query_and_kv_projection() -> None:
    x = testing.random_sequence(B, T, D, seed=3)
    rope = ApplyRotaryPositionalEncoding.Config(max_wavelength=100.0)
    cfg = dsa(
        use_sink_scalars=True,
        input_projection=QueryAndKeyValueProjection(),
        query_network=rope,
        key_network=rope,
    )
    layer = bind(cfg, x)
    assert layer.variables["params"]["key_value_projection"]["kernel"].shape == (D, 2, H, U)
    testing.verify_contract(layer, x, training=False, rtol=1e-5, atol=1e-5)


def test_contract_bfloat16() -> None:
    x = testing.random_sequence(B, T, D, seed=4).astype(jnp.bfloat16)
    cfg = dsa(max_future_horizon=1, param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
    layer = bind(cfg, x)
    y = testing.verify_contract(layer, x, training=False, rtol=5e-2, atol=5e-2)
    assert y.dtype == jnp.bfloat16


def test_param_tree_mirrors_reference() -> None:
    x = testing.random_sequence(B, T, D, seed=0)
    layer = bind(dsa(use_bias=True), x)
    shapes = jax.tree.map(lambda a: a.shape, layer.variables["params"])
    assert shapes == {"query_key_value_projection": {"kernel": (D, 3, H, U), "bias": (3, H, U)}}


def test_state_shapes_independent_of_stream_length() -> None:
    cfg = dsa(max_past_horizon=5, max_future_horizon=2)
    shapes = []
    for t in (4, 12):
        x = testing.random_sequence(B, t, D, seed=5)
        layer = bind(cfg, x)
        _, state, _ = step_by_step_static(layer, x, training=False)
        shapes.append(jax.tree.map(lambda a: (a.shape, a.dtype), state))
    assert shapes[0] == shapes[1]
    keys, values, kv_mask, time_step, *_ = jax.tree.leaves(
        shapes[0], is_leaf=lambda s: isinstance(s, tuple) and len(s) == 2
    )
    # The ring-buffer cache is head-major with a spare slot (see KVCacheSelfAttention).
    assert keys[0] == (B, H, 8, U) and values[0] == (B, H, 8, U)
    assert kv_mask[0] == (B, 8) and time_step[0] == (B,)


def test_time_step_is_per_row() -> None:
    x = testing.random_sequence(B, 4, D, seed=6)
    layer = bind(dsa(), x)
    state = layer.get_initial_state(B, x.channel_spec, training=False)
    _, state = layer.step(x, state, training=False)
    np.testing.assert_array_equal(np.asarray(state[3]), [4, 4])


def test_ringbuffer_contract_one_frame_at_a_time() -> None:
    x = testing.random_sequence(B, T, D, seed=7)
    cfg = dsa(max_past_horizon=3, max_future_horizon=1, use_kv_cache_ringbuffer=True)
    layer = bind(cfg, x)
    # One frame per step only: the 2x-block check would (correctly) raise.
    testing.verify_contract(layer, x, training=False, rtol=1e-5, atol=1e-5, test_2x_step=False)
    state = layer.get_initial_state(B, x.channel_spec, training=False)
    assert state[0].shape == (B, 4, H, U)


def test_ringbuffer_rejects_multi_frame_steps() -> None:
    x = testing.random_sequence(B, 2, D, seed=8)
    layer = bind(dsa(use_kv_cache_ringbuffer=True), x)
    state = layer.get_initial_state(B, x.channel_spec, training=False)
    with pytest.raises(ValueError, match="exactly one frame"):
        layer.step(x, state, training=False)


@pytest.mark.parametrize(("past", "future"), [(-1, 0), (2, -1)])
def test_unbounded_horizons_layer_only(past: int, future: int) -> None:
    x = testing.random_sequence(B, T, D, seed=9)
    layer = bind(dsa(max_past_horizon=past, max_future_horizon=future), x)
    assert not layer.supports_step
    y = layer.layer(x, training=False)
    assert y.shape == (B, T, H, U)
    state = layer.get_initial_state(B, x.channel_spec, training=False)
    with pytest.raises(ValueError, match=r"does not support step.*unbounded horizon"):
        layer.step(x, state, training=False)


def test_config_validation() -> None:
    x = testing.random_sequence(B, T, D, seed=0)
    with pytest.raises(ValueError, match="both 0"):
        bind(dsa(max_past_horizon=0, max_future_horizon=0), x)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        bind(
            dsa(num_heads=3, num_kv_heads=2, input_projection=SeparateQueryKeyValueProjection()), x
        )
    with pytest.raises(ValueError, match="num_heads == num_kv_heads"):
        bind(dsa(num_heads=4, num_kv_heads=2), x)
    with pytest.raises(ValueError, match=r"\[b, t, d\]"):
        bind(dsa(), testing.random_sequence(B, T, 2, 2, seed=0))


def _numpy_attention(
    x: np.ndarray, mask: np.ndarray, kernel: np.ndarray, past: int, future: int
) -> np.ndarray:
    q = np.einsum("btd,dhu->bthu", x, kernel[:, 0])
    k = np.einsum("btd,dhu->bthu", x, kernel[:, 1])
    v = np.einsum("btd,dhu->bthu", x, kernel[:, 2])
    t = x.shape[1]
    logits = np.einsum("bqhu,bkhu->bhqk", q, k) / np.sqrt(q.shape[-1])
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    visible = (j - i >= -past) & (j - i <= future)
    visible = visible[None, None] & mask[:, None, None, :]
    logits = np.where(visible, logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhu->bqhu", p, v)


def test_numerics_and_emits_against_numpy() -> None:
    x = testing.random_sequence(B, 6, D, random_lengths=False, seed=10)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
    x = Sequence(x.values, jnp.asarray(mask)).mask_invalid()
    layer = bind(dsa(max_past_horizon=2, max_future_horizon=1), x)
    y, emits = layer.layer_with_emits(x, training=False)
    kernel = np.asarray(layer.variables["params"]["query_key_value_projection"]["kernel"])
    expected = _numpy_attention(np.asarray(x.values), mask, kernel, 2, 1)
    got = np.asarray(y.mask_invalid().values)
    np.testing.assert_allclose(got, np.where(mask[:, :, None, None], expected, 0), atol=1e-5)
    assert isinstance(emits, SelfAttentionEmits)
    probs = np.asarray(emits.probabilities.values)
    assert probs.shape == (B, 6, H, 6)
    sums = probs.sum(-1)
    np.testing.assert_allclose(sums[mask], 1.0, atol=1e-5)
    # Invalid keys get exactly zero probability.
    assert np.all(probs[1][:, :, 4:] == 0)


def test_step_emits_probabilities_sum_to_one() -> None:
    x = testing.random_sequence(B, 8, D, random_lengths=False, seed=11)
    layer = bind(dsa(max_past_horizon=2, max_future_horizon=1), x)
    state = layer.get_initial_state(B, x.channel_spec, training=False)
    _, _, emits = layer.step_with_emits(x[:, :4], state, training=False)
    probs = np.asarray(emits.probabilities.values)
    # Ring slots (W + 1, see KVCacheSelfAttention), then the block.
    assert probs.shape == (B, 4, H, 3 + 1 + 4)
    valid = np.asarray(emits.probabilities.mask)
    assert not valid[:, 0].any()  # the latency frame is invalid
    np.testing.assert_allclose(probs.sum(-1)[valid], 1.0, atol=1e-5)


def test_no_nan_from_invalid_frames() -> None:
    x = testing.random_sequence(B, T, D, seed=12)
    x = x.mask_invalid(jnp.nan)
    layer = bind(dsa(max_future_horizon=1), testing.random_sequence(B, T, D, seed=12))
    y = layer.layer(x, training=False)
    assert np.all(np.isfinite(np.asarray(y.values)))


@pytest.mark.parametrize(("t", "past", "future", "tile"), [(64, 3, 2, 16), (160, 36, 4, 32)])
def test_long_layer_tiles_queries_with_the_same_result(
    t: int, past: int, future: int, tile: int
) -> None:
    # t frames against a band of past + future: layer() tiles queries
    # (see DotProductSelfAttention._layer_query_block; tiles of 32 once the
    # band is that wide); the result, the dense [t, t] emits and the
    # agreement with step() must not change.
    x = testing.random_sequence(B, t, D, seed=12)
    mask = np.asarray(x.mask)
    layer = bind(dsa(max_past_horizon=past, max_future_horizon=future), x)
    assert layer._layer_query_block(t) == tile
    y, emits = layer.layer_with_emits(x, training=False)
    kernel = np.asarray(layer.variables["params"]["query_key_value_projection"]["kernel"])
    with np.errstate(invalid="ignore"):  # invalid queries past the end see no key
        expected = _numpy_attention(np.asarray(x.values), mask, kernel, past, future)
    got = np.asarray(y.mask_invalid().values)
    np.testing.assert_allclose(got[mask], expected[mask], atol=1e-5)
    probs = np.asarray(emits.probabilities.values)
    assert probs.shape == (B, t, H, t)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    outside = ~((j - i >= -past) & (j - i <= future))  # [query, key]
    assert np.all(probs.transpose(0, 2, 1, 3)[:, :, outside] == 0)
    np.testing.assert_allclose(probs.sum(-1)[mask], 1.0, atol=1e-5)
    testing.verify_contract(layer, x, training=False, rtol=1e-5, atol=1e-5)
