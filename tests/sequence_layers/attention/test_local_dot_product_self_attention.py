"""LocalDotProductSelfAttention: contract and equality with DotProductSelfAttention."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest

from sequence_layers import testing
from sequence_layers.attention import DotProductSelfAttention, LocalDotProductSelfAttention
from sequence_layers.attention.local_dot_product_self_attention import extract_block_context
from sequence_layers.sequence import Sequence
from sequence_layers.utils import step_by_step_static

B, T, D, H, U = 2, 10, 3, 2, 4


def bind(cfg: Any, x: Sequence, seed: int = 0) -> Any:
    layer = cfg.make()
    params = layer.init(jax.random.PRNGKey(seed), x, training=False, method=layer.layer)
    return layer.bind(params)


def local(**kw: Any) -> LocalDotProductSelfAttention.Config:
    kw.setdefault("num_heads", H)
    kw.setdefault("units_per_head", U)
    kw.setdefault("block_size", 4)
    kw.setdefault("max_past_horizon", 3)
    return LocalDotProductSelfAttention.Config(**kw)


@pytest.mark.parametrize(
    ("past", "future", "block"), [(3, 0, 4), (2, 2, 3)], ids=["causal", "both"]
)
def test_contract(past: int, future: int, block: int) -> None:
    x = testing.random_sequence(B, T, D, seed=1)
    layer = bind(local(max_past_horizon=past, max_future_horizon=future, block_size=block), x)
    assert layer.block_size == 1
    assert layer.input_latency == future and layer.output_latency == future
    assert layer.receptive_field_per_step == {0: (-past, future)}
    y = testing.verify_contract(layer, x, training=False, rtol=1e-5, atol=1e-5)
    assert y.shape == (B, T, H, U)


@pytest.mark.parametrize(("past", "future"), [(3, 0), (2, 3)])
def test_matches_dense_self_attention(past: int, future: int) -> None:
    x = testing.random_sequence(B, T, D, seed=2)
    common = dict(num_heads=H, units_per_head=U, max_past_horizon=past, max_future_horizon=future)
    loc = bind(LocalDotProductSelfAttention.Config(block_size=4, **common), x)
    dense = DotProductSelfAttention.Config(**common).make().bind(loc.variables)
    y_local = loc.layer(x, training=False).mask_invalid()
    y_dense = dense.layer(x, training=False).mask_invalid()
    np.testing.assert_allclose(y_local.values, y_dense.values, rtol=1e-5, atol=1e-5)


def test_layer_emits_window_probabilities() -> None:
    x = testing.random_sequence(B, T, D, seed=3)
    layer = bind(local(max_past_horizon=2, max_future_horizon=1, block_size=4), x)
    _, emits = layer.layer_with_emits(x, training=False)
    probs = np.asarray(emits.probabilities.values)
    assert probs.shape == (B, T, H, 2 + 4 + 1)
    valid = np.asarray(emits.probabilities.mask)
    np.testing.assert_allclose(probs.sum(-1)[valid], 1.0, atol=1e-5)


def test_state_is_a_bounded_kv_cache() -> None:
    cfg = local(max_past_horizon=4, max_future_horizon=2)
    shapes = []
    for t in (3, 11):
        x = testing.random_sequence(B, t, D, seed=4)
        layer = bind(cfg, x)
        _, state, _ = step_by_step_static(layer, x, training=False)
        shapes.append(jax.tree.map(lambda a: a.shape, state))
    assert shapes[0] == shapes[1]
    # Head-major ring buffer with a spare slot (see KVCacheSelfAttention).
    assert shapes[0][0] == (B, H, 7, U)


def test_ringbuffer_rejects_multi_frame_steps() -> None:
    x = testing.random_sequence(B, 2, D, seed=5)
    layer = bind(local(use_kv_cache_ringbuffer=True), x)
    state = layer.get_initial_state(B, x.channel_spec, training=False)
    with pytest.raises(ValueError, match="exactly one frame"):
        layer.step(x, state, training=False)


def test_config_validation() -> None:
    x = testing.random_sequence(B, T, D, seed=0)
    with pytest.raises(ValueError, match="max_past_horizon >= 1"):
        bind(local(max_past_horizon=0, max_future_horizon=2), x)
    with pytest.raises(ValueError, match="max_future_horizon >= 0"):
        bind(local(max_future_horizon=-1), x)
    with pytest.raises(ValueError, match="block_size >= 1"):
        bind(local(block_size=0), x)


def test_extract_block_context() -> None:
    x = np.arange(1, 6, dtype=np.int32)[None, :]  # frames 1..5
    blocks = np.asarray(extract_block_context(x, block_size=2, past=1, future=1))
    np.testing.assert_array_equal(blocks[0], [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 0, 0]])


def test_layer_tiles_larger_than_block_size_give_the_same_outputs_and_emits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`layer()` computes in tiles of several `block_size` blocks
    (`layer_query_tile`: 6 queries here, 3 blocks); outputs and the emitted
    per-block windows equal those of tiles of one block."""
    from sequence_layers.attention import local_dot_product_self_attention as local_module

    x = testing.random_sequence(B, 23, D, seed=4)
    layer = bind(local(max_past_horizon=5, max_future_horizon=2, block_size=2), x)
    assert local_module.layer_query_tile(2, 5, 2) == 6
    y, emits = layer.layer_with_emits(x, training=False)
    monkeypatch.setattr(local_module, "layer_query_tile", lambda block, past, future: block)
    y_blocks, emits_blocks = layer.layer_with_emits(x, training=False)
    assert emits.probabilities.shape == (B, 23, H, 5 + 2 + 2)
    valid = np.asarray(y.mask)
    np.testing.assert_allclose(
        np.asarray(y.values)[valid], np.asarray(y_blocks.values)[valid], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(emits.probabilities.values)[valid],
        np.asarray(emits_blocks.probabilities.values)[valid],
        rtol=1e-5,
        atol=1e-6,
    )
