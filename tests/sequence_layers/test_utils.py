"""Tests of `utils.py`: padding rules (REFERENCE section 2), conv masks,
composition of latency / block size / receptive field (sections 1 and 3),
and the running helpers."""

from __future__ import annotations

import math
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest
from toy_layers import RunningSum, ToyConv

from sequence_layers import testing, types, utils
from sequence_layers.sequence import Sequence

INF = math.inf


def conv(kernel: int, stride: int = 1, padding: str = "causal") -> types.SequenceLayer:
    return types.detached(ToyConv.Config(kernel, stride, padding))


# Padding rules -------------------------------------------------------------------

# mode: ((left, right) at stride 1, at stride 2), for k = 5.
PADDING_TABLE = {
    "valid": ((0, 0), (0, 0)),
    "same": ((2, 2), (2, 2)),
    "causal_valid": ((4, 0), (4, 0)),
    "reverse_causal_valid": ((0, 4), (0, 4)),
    "causal": ((4, 0), (4, 0)),
    "reverse_causal": ((0, 4), (0, 4)),
    "semicausal": ((4, 0), (3, 1)),
    "semicausal_full": ((4, 4), (3, 4)),
}


@pytest.mark.parametrize("padding", list(PADDING_TABLE))
def test_explicit_padding_table(padding: str) -> None:
    stride1, stride2 = PADDING_TABLE[padding]
    assert utils.convolution_explicit_padding(padding, 5, 1) == stride1
    assert utils.convolution_explicit_padding(padding, 5, 2) == stride2
    # Dilation enters through the effective kernel size: (3 - 1) * 2 + 1 = 5.
    assert utils.convolution_explicit_padding(padding, 3, 2, dilation_rate=2) == stride2
    assert utils.convolution_explicit_padding(types.PaddingMode(padding), 5, 2) == stride2


def test_explicit_padding_values() -> None:
    assert utils.convolution_explicit_padding("same", 4) == (1, 2)
    assert utils.convolution_explicit_padding("semicausal", 2, 3) == (0, 1)
    assert utils.convolution_explicit_padding("semicausal", 1, 1) == (0, 0)
    assert utils.effective_kernel_size(4, 3) == 10
    with pytest.raises(ValueError, match="Unknown padding"):
        utils.convolution_explicit_padding("full", 3)


@pytest.mark.parametrize(
    ("padding", "in_lat", "out_lat_s1", "out_lat_s2", "buffer_s2", "valid_buffer"),
    [
        ("causal_valid", 0, 0, 0, 4, True),
        ("reverse_causal_valid", 4, 4, 2, 4, False),
        ("causal", 0, 0, 0, 4, False),
        ("reverse_causal", 4, 4, 2, 4, False),
        ("semicausal", 0, 0, 0, 3, False),
    ],
)
def test_latency_and_buffers(
    padding: str, in_lat: int, out_lat_s1: int, out_lat_s2: int, buffer_s2: int, valid_buffer: bool
) -> None:
    assert utils.conv_input_latency(padding, 5) == in_lat
    assert utils.conv_output_latency(padding, 5, 1) == out_lat_s1
    assert utils.conv_output_latency(padding, 5, 2) == out_lat_s2
    assert utils.conv_buffer_width(padding, 5, 2) == buffer_s2
    assert utils.conv_initial_buffer_valid(padding) is valid_buffer


def test_latency_of_non_steppable_modes() -> None:
    assert utils.conv_input_latency("semicausal_full", 5) == 4
    assert utils.conv_output_latency("semicausal_full", 5, 2) == 0
    assert utils.conv_input_latency("same", 5) == 0
    assert utils.conv_buffer_width("reverse_causal", 5, 3) == 3
    for padding in ("same", "valid", "semicausal_full"):
        with pytest.raises(ValueError, match="not steppable"):
            utils.conv_buffer_width(padding, 5)


def test_conv_output_length() -> None:
    assert utils.conv_output_length(10, "valid", 5) == 6
    assert utils.conv_output_length(10, "causal", 5, 2) == 5
    assert utils.conv_output_length(10, "same", 5, 3) == 4
    assert utils.conv_output_length(2, "valid", 5) == 0


def test_layer_masks() -> None:
    mask = jnp.array([[1, 1, 1, 1, 1, 0]], bool)

    def layer_mask(padding: str, k: int = 3, s: int = 1) -> list[int]:
        return utils.compute_conv_mask(mask, k, s, 1, padding, False).astype(int)[0].tolist()

    assert layer_mask("causal") == [1, 1, 1, 1, 1, 0]
    assert layer_mask("causal", s=2) == [1, 1, 1]
    assert layer_mask("valid") == [1, 1, 1, 0]
    assert layer_mask("causal_valid") == [1, 1, 1, 1, 1, 0]  # front padding counts as valid
    assert layer_mask("reverse_causal_valid") == [1, 1, 1, 0, 0, 0]
    assert layer_mask("semicausal_full") == [1, 1, 1, 1, 1, 1, 1, 0]
    # Dilation 2: windows are the taps {0, 2, 4} and {1, 3, 5}.
    dilated = utils.compute_conv_mask(mask, 3, 1, 2, "valid", False)
    assert dilated.astype(int).tolist() == [[1, 0]]
    short = jnp.ones((1, 2), bool)
    assert utils.compute_conv_mask(short, 5, 1, 1, "valid", False).shape == (1, 0)


def test_step_masks_line_up_with_the_buffer() -> None:
    # reverse_causal k=3, s=1: buffer of 2 frames, output j at buffer-frame j.
    ext = jnp.array([[0, 0, 1, 1]], bool)
    out = utils.compute_conv_mask(ext, 3, 1, 1, "reverse_causal", True)
    assert out.astype(int).tolist() == [[0, 0]]
    ext = jnp.array([[1, 1, 1, 0]], bool)
    assert utils.compute_conv_mask(ext, 3, 1, 1, "causal_valid", True).tolist() == [[True, False]]


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "field"),
    [
        (5, 1, "causal", (-4, 0)),
        (5, 1, "same", (-2, 2)),
        (5, 2, "causal", (-4, 0)),
        (5, 2, "reverse_causal", (0, 4)),
        (5, 2, "semicausal", (-3, 1)),
    ],
)
def test_conv_receptive_field(kernel: int, stride: int, padding: str, field: tuple) -> None:
    assert utils.conv_receptive_field_per_step(kernel, stride, 1, padding) == {0: field}


# Composition ---------------------------------------------------------------------


def test_reference_conv_properties() -> None:
    # REFERENCE section 1, Conv1D table.
    strided = conv(5, 2, "reverse_causal")
    assert (strided.block_size, strided.output_ratio) == (2, Fraction(1, 2))
    assert (strided.input_latency, strided.output_latency) == (4, 2)
    assert conv(5, 2, "semicausal").receptive_field == (-3, 1)
    assert not conv(5, 1, "same").supports_step


def test_serial_latency_cases() -> None:
    a, b = conv(4, 2, "causal"), conv(5, 1, "reverse_causal")
    assert (utils.serial_input_latency([a, b]), utils.serial_output_latency([a, b])) == (8, 4)
    assert (utils.serial_input_latency([b, a]), utils.serial_output_latency([b, a])) == (4, 2)
    lagging, downsample = conv(2, 1, "reverse_causal"), conv(1, 2, "causal")
    with pytest.raises(ValueError, match="Delay"):
        utils.serial_output_latency([lagging, downsample])
    assert utils.serial_input_latency([]) == 0 and utils.serial_output_latency([]) == 0


def test_serial_block_size_and_ratio() -> None:
    layers = [conv(3, 2), conv(3, 3)]
    assert utils.serial_block_size(layers) == 6
    assert utils.serial_output_ratio(layers) == Fraction(1, 6)
    assert utils.serial_block_size([conv(3, 2), conv(3, 2), conv(3, 1)]) == 4
    assert utils.serial_block_size([conv(3, 1)]) == 1


@pytest.mark.parametrize(
    ("layers", "field"),
    [
        ([conv(5)], (-4, 0)),
        ([conv(5, 1, "same")], (-2, 2)),
        ([conv(5, 1, "same")] * 4, (-8, 8)),
        ([conv(5)] * 4, (-16, 0)),
        ([conv(4, 2), conv(3)], (-7, 0)),  # second window spans 3 strided outputs
        ([conv(3, 1, "reverse_causal"), conv(3)], (-2, 2)),
        ([types.detached(RunningSum.Config()), conv(3, 1, "reverse_causal")], (-INF, 2)),
        ([], (0, 0)),
    ],
)
def test_serial_receptive_field(layers: list, field: tuple) -> None:
    assert utils.serial_receptive_field_per_step(layers) == {0: field}


def test_parallel_receptive_field_unions() -> None:
    assert utils.parallel_receptive_field_per_step([{0: (-1, 0)}, {0: (0, 2)}]) == {0: (-1, 2)}
    merged = utils.parallel_receptive_field_per_step([{0: (0, 0)}, {0: None, 1: (-3, -3)}])
    assert merged == {0: (0, 0), 1: (-3, 0)}
    assert utils.parallel_receptive_field_per_step([{0: None}, {0: None}]) == {0: None}


def test_config_level_queries() -> None:
    config = ToyConv.Config(5, 2, "reverse_causal")
    assert utils.get_input_latency(config) == 4
    assert utils.get_output_latency(config) == 2
    assert utils.get_output_ratio(config) == Fraction(1, 2)
    assert utils.get_block_size(config) == 2
    assert utils.as_padding_mode(types.PaddingMode.CAUSAL) == "causal"


# Running helpers -------------------------------------------------------------------


def test_batch_where() -> None:
    new = {"s": Sequence(jnp.ones((3, 2, 1)), jnp.ones((3, 2), bool)), "n": jnp.ones((3,))}
    old = {"s": Sequence(jnp.zeros((3, 2, 1)), jnp.zeros((3, 2), bool)), "n": jnp.zeros((3,))}
    out = utils.batch_where(jnp.array([True, False, True]), new, old)
    assert type(out["s"]) is Sequence
    np.testing.assert_array_equal(out["s"].values[:, 0, 0], [1, 0, 1])
    np.testing.assert_array_equal(out["s"].mask[:, 1], [True, False, True])
    np.testing.assert_array_equal(out["n"], [1, 0, 1])


def test_step_by_step_static() -> None:
    x = testing.random_sequence(2, 7, 2, seed=5)
    layer = testing.init_and_bind(ToyConv.Config(4, 2, "reverse_causal"), x)
    y_layer = layer.layer(x, training=False)
    xp = x.pad_time(0, layer.input_latency, valid=False)
    for blocks in (1, 2):
        y, state, emits = utils.step_by_step_static(
            layer, xp, training=False, blocks_per_step=blocks
        )
        # 10 input frames padded to whole blocks, ratio 1/2.
        assert y.shape[1] == math.ceil(10 / (2 * blocks)) * blocks
        assert emits == () and state.shape == (2, 2, 2)
        testing.assert_sequences_close(y_layer, y[:, layer.output_latency :], rtol=1e-5, atol=1e-5)
    _, _, emits = utils.step_by_step_static(layer, xp, training=False, with_emits=True)
    assert len(emits) == 5
    state = layer.get_initial_state(2, x.channel_spec, training=False)
    empty, final, _ = utils.step_by_step_static(
        layer, x[:, :0], training=False, initial_state=state
    )
    assert empty.shape == (2, 0, 2) and final is state
