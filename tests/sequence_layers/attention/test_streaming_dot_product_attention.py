"""StreamingDotProductAttention and StreamingLocalDotProductAttention."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest

from sequence_layers import testing
from sequence_layers.attention import (
    CrossAttentionEmits,
    StreamingDotProductAttention,
    StreamingLocalDotProductAttention,
)
from sequence_layers.sequence import Sequence

B, T, D, DS, H, U = 2, 11, 3, 5, 2, 4


def bind(cfg: Any, x: Sequence, constants: dict, seed: int = 0) -> Any:
    layer = cfg.make()
    params = layer.init(
        jax.random.PRNGKey(seed), x, training=False, constants=constants, method=layer.layer
    )
    return layer.bind(params)


def streaming(local: bool, **kw: Any) -> Any:
    kw.setdefault("source_name", "src")
    kw.setdefault("num_heads", H)
    kw.setdefault("units_per_head", U)
    kw.setdefault("max_past_horizon", 3)
    if local:
        return StreamingLocalDotProductAttention.Config(block_size=4, **kw)
    return StreamingDotProductAttention.Config(**kw)


def step_streamed(layer: Any, x: Sequence, src: Sequence, block: int) -> Sequence:
    """Steps x and the source together, `block` frames at a time."""
    lat = layer.input_latency
    x = x.pad_time(0, lat, valid=False).pad_to_multiple(block)
    src = src.pad_time(0, lat, valid=False).pad_to_multiple(block)
    state = layer.get_initial_state(B, x.channel_spec, training=False, constants={"src": src})
    outputs = []
    for start in range(0, x.shape[1], block):
        y, state = layer.step(
            x[:, start : start + block],
            state,
            training=False,
            constants={"src": src[:, start : start + block]},
        )
        outputs.append(y)
    return Sequence.concatenate_sequences(outputs)[:, layer.output_latency :]


@pytest.mark.parametrize("local", [False, True], ids=["dense", "local"])
@pytest.mark.parametrize(("past", "future"), [(3, 0), (2, 2)])
def test_step_matches_layer(local: bool, past: int, future: int) -> None:
    x = testing.random_sequence(B, T, D, seed=1)
    src = Sequence(testing.random_sequence(B, T, DS, seed=2).values, x.mask).mask_invalid()
    layer = bind(
        streaming(local, max_past_horizon=past, max_future_horizon=future), x, {"src": src}
    )
    assert layer.block_size == 1 and layer.input_latency == future
    assert layer.receptive_field_per_step == {0: (0, 0)}
    y = layer.layer(x, training=False, constants={"src": src}).mask_invalid()
    for block in (1, 3):
        y_step = step_streamed(layer, x, src, block)[:, :T].mask_invalid()
        np.testing.assert_array_equal(np.asarray(y_step.mask), np.asarray(y.mask))
        np.testing.assert_allclose(y_step.values, y.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("local", [False, True], ids=["dense", "local"])
def test_verify_contract_with_streamed_constants(local: bool) -> None:
    x = testing.random_sequence(B, T, D, seed=3)
    src = Sequence(testing.random_sequence(B, T, DS, seed=4).values, x.mask).mask_invalid()
    layer = bind(streaming(local, max_future_horizon=1), x, {"src": src})
    testing.verify_contract(
        layer, x, training=False, constants={"src": src}, stream_constants=True, pad_constants=True
    )


def test_local_matches_dense_layerwise() -> None:
    x = testing.random_sequence(B, T, D, seed=5)
    src = Sequence(testing.random_sequence(B, T, DS, seed=6).values, x.mask).mask_invalid()
    loc = bind(streaming(True, max_future_horizon=2), x, {"src": src})
    dense = streaming(False, max_future_horizon=2).make().bind(loc.variables)
    y_loc, emits = loc.layer_with_emits(x, training=False, constants={"src": src})
    y_dense = dense.layer(x, training=False, constants={"src": src})
    np.testing.assert_allclose(
        y_loc.mask_invalid().values, y_dense.mask_invalid().values, rtol=1e-5, atol=1e-5
    )
    assert isinstance(emits, CrossAttentionEmits) and "src" in emits.probabilities_by_source


def test_source_length_must_match() -> None:
    x = testing.random_sequence(B, T, D, seed=7)
    src = testing.random_sequence(B, T - 1, DS, seed=8)
    with pytest.raises(ValueError, match="streams its source"):
        bind(streaming(False), x, {"src": src})


def test_config_validation() -> None:
    x = testing.random_sequence(B, T, D, seed=7)
    src = testing.random_sequence(B, T, DS, seed=8)
    with pytest.raises(ValueError, match="max_past_horizon >= 1"):
        bind(streaming(False, max_past_horizon=0, max_future_horizon=1), x, {"src": src})
