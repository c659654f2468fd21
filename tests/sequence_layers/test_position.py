"""Tests for AddTimingSignal and ApplyRotaryPositionalEncoding."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import position, testing, types, utils
from sequence_layers.sequence import Sequence


def _verify(config: types.SequenceLayerConfig, x: Sequence, **kwargs: Any) -> Any:
    layer = testing.init_and_bind(config, x)
    # Valid-only positions declare (-inf, 0): a frame's position depends on
    # the masks of all earlier frames, which the Jacobian cannot see.
    relaxed = bool(math.isinf(layer.receptive_field_per_step[0][0]))
    y = testing.verify_contract(layer, x, jit=True, relaxed_receptive_field=relaxed, **kwargs)
    return layer, y


def _run_with_resets(
    layer: Any, x: Sequence, block: int, resets: dict[int, list[bool]]
) -> Sequence:
    """Steps `x` block by block; before block i, rows flagged in resets[i]
    go back to the initial state (as a server does for a new stream)."""
    initial = layer.get_initial_state(x.shape[0], x.channel_spec, training=False)
    state = initial
    outputs = []
    for i in range(x.shape[1] // block):
        if i in resets:
            state = utils.batch_where(jnp.asarray(resets[i]), initial, state)
        y, state = layer.step(x[:, i * block : (i + 1) * block], state, training=False)
        outputs.append(y)
    return Sequence.concatenate_sequences(outputs)


def _assert_rows_independent(config: types.SequenceLayerConfig, x: Sequence) -> None:
    """Row 1 reset before block 2 equals row 1's input from block 2 run alone;
    row 0 reset before block 1 likewise."""
    layer = testing.init_and_bind(config, x)
    y = _run_with_resets(layer, x, 1, {1: [True, False], 2: [False, True]})
    for row, start in ((0, 1), (1, 2)):
        alone = layer.layer(x[row : row + 1, start:], training=False)
        got = y[row : row + 1, start:]
        np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(alone.mask))
        np.testing.assert_allclose(
            np.asarray(got.mask_invalid().values),
            np.asarray(alone.mask_invalid().values),
            rtol=1e-6,
            atol=1e-6,
        )


@pytest.mark.parametrize(
    "config",
    [
        position.AddTimingSignal.Config(),
        position.AddTimingSignal.Config(
            trainable_scale=True, axes=-1, only_advance_position_for_valid_timesteps=False
        ),
    ],
    ids=["valid_only", "physical_scaled"],
)
def test_add_timing_signal_contract(config: position.AddTimingSignal.Config) -> None:
    x = testing.random_sequence(2, 6, 2, 5, seed=1)
    _verify(config, x)


def test_timing_signal_values() -> None:
    x = Sequence.from_lengths(jnp.zeros((1, 3, 4)), [3]).mask_invalid()
    layer = position.AddTimingSignal.Config(min_timescale=1.0, max_timescale=100.0).make()
    y = layer.apply({}, x, training=False, method="layer")
    inv = np.asarray([1.0, 0.01])  # geometric from 1 to 1/100
    pos = np.arange(3)[:, None] * inv[None, :]
    expected = np.concatenate([np.sin(pos), np.cos(pos)], axis=1)
    np.testing.assert_allclose(np.asarray(y.values[0]), expected, rtol=1e-6, atol=1e-6)


def test_timing_signal_skips_invalid_frames() -> None:
    # Valid-only positions: an invalid frame does not advance the position.
    mask = jnp.asarray([[True, False, True]])
    x = Sequence(jnp.zeros((1, 3, 2)), mask)
    layer = position.AddTimingSignal.Config().make()
    state = layer.get_initial_state(1, x.channel_spec, training=False)
    assert state.shape == (1, 1)
    y, state = layer.apply({}, x, state, training=False, method="step")
    np.testing.assert_allclose(np.asarray(y.values[0, 2]), [np.sin(1.0), np.cos(1.0)], atol=1e-6)
    assert int(state[0, 0]) == 1


@pytest.mark.parametrize(
    "config",
    [
        position.AddTimingSignal.Config(),
        position.ApplyRotaryPositionalEncoding.Config(max_wavelength=100.0),
    ],
    ids=["timing", "rope"],
)
def test_rows_reset_independently(config: types.SequenceLayerConfig) -> None:
    x = testing.random_sequence(2, 5, 4, random_lengths=False, seed=2)
    _assert_rows_independent(config, x)


@pytest.mark.parametrize(
    "config",
    [
        position.ApplyRotaryPositionalEncoding.Config(max_wavelength=100.0),
        position.ApplyRotaryPositionalEncoding.Config(
            max_wavelength=50.0, axis=2, only_advance_position_for_valid_timesteps=False
        ),
    ],
    ids=["valid_only", "physical_axis2"],
)
def test_rope_contract(config: position.ApplyRotaryPositionalEncoding.Config) -> None:
    x = testing.random_sequence(2, 6, 2, 4, seed=3)
    _verify(config, x)


def test_rope_values_by_hand() -> None:
    x = Sequence.from_values(jnp.asarray([[[1.0, 0.0, 0.0, 1.0]] * 3]))
    layer = position.ApplyRotaryPositionalEncoding.Config(max_wavelength=4.0).make()
    y = layer.apply({}, x, training=False, method="layer")
    # Pairs (x[i], x[i + 2]) rotate by position / 4 ** (2 i / 4).
    for t in range(3):
        a0, a1 = t / 1.0, t / 2.0
        expected = [math.cos(a0), -math.sin(a1), math.sin(a0), math.cos(a1)]
        np.testing.assert_allclose(np.asarray(y.values[0, t]), expected, atol=1e-6)


def test_rope_positions_from_constants() -> None:
    x = testing.random_sequence(2, 4, 4, random_lengths=False, seed=4)
    positions = jnp.asarray([[0, 1, 2, 3], [5, 6, 7, 8]], jnp.int32)
    layer = position.ApplyRotaryPositionalEncoding.Config(
        max_wavelength=100.0, positions_name="pos"
    ).make()
    physical = position.ApplyRotaryPositionalEncoding.Config(
        max_wavelength=100.0, only_advance_position_for_valid_timesteps=False
    ).make()
    y = layer.apply({}, x, training=False, constants={"pos": positions}, method="layer")
    y_ref = physical.apply({}, x, training=False, method="layer")
    np.testing.assert_allclose(np.asarray(y.values[0]), np.asarray(y_ref.values[0]), atol=1e-6)
    assert layer.receptive_field_per_step == {0: (0, 0)}
    # Step mode reads the block's positions from a streamed Sequence constant.
    bound = testing.init_and_bind(layer, x, constants={"pos": positions})
    testing.verify_contract(
        bound,
        x,
        constants={"pos": Sequence.from_values(positions)},
        stream_constants=True,
        pad_constants=True,
        jit=True,
    )
    with pytest.raises(ValueError, match="missing"):
        layer.apply({}, x, training=False, constants={}, method="layer")


def test_rope_validation() -> None:
    x = testing.random_sequence(1, 2, 3)
    with pytest.raises(ValueError, match="even"):
        position.ApplyRotaryPositionalEncoding.Config(10.0).make().apply(
            {}, x, training=False, method="layer"
        )
    xi = Sequence.from_values(jnp.zeros((1, 2, 4), jnp.int32))
    with pytest.raises(ValueError, match="floating point"):
        position.AddTimingSignal.Config().make().apply({}, xi, training=False, method="layer")


def test_state_is_per_row() -> None:
    layer = position.ApplyRotaryPositionalEncoding.Config(max_wavelength=10.0).make()
    spec = jax.ShapeDtypeStruct((4,), jnp.float32)
    assert layer.get_initial_state(3, spec, training=False).shape == (3, 1)


@pytest.mark.parametrize(
    "config",
    [
        position.AddTimingSignal.Config(axes=(-1,), trainable_scale=True),
        position.ApplyRotaryPositionalEncoding.Config(max_wavelength=100.0, axis=-1),
    ],
    ids=["timing", "rope"],
)
def test_serialization_round_trip(config: types.SequenceLayerConfig) -> None:
    from sequence_layers import serialization

    restored = serialization.loads(serialization.dumps(config))
    assert restored == config
    x = testing.random_sequence(2, 4, 4, seed=9)
    layer = testing.init_and_bind(config, x)
    y = layer.layer(x, training=False)
    y2 = restored.make().apply(layer.variables, x, training=False, method="layer")
    np.testing.assert_array_equal(np.asarray(y.values), np.asarray(y2.values))
