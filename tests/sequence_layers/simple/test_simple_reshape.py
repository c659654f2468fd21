"""Channel-shape operations and the (non-steppable) global reshapes."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import MaskedSequence, Sequence, simple, testing

# (config, input channel shape, numpy equivalent on [b, t, *c])
CASES = [
    (simple.Slice.Config([(None, None, 2), 1]), (3, 4), lambda v: v[:, :, ::2, 1]),
    (simple.Slice.Config([None, slice(1, 3)]), (4,), lambda v: v[:, :, None, 1:3]),
    (simple.Flatten.Config(), (2, 3), lambda v: v.reshape(*v.shape[:2], 6)),
    (simple.ExpandDims.Config((0, -2)), (2, 3), lambda v: v[:, :, None, :, None, :]),
    (simple.Reshape.Config((3, 2)), (2, 3), lambda v: v.reshape(*v.shape[:2], 3, 2)),
    (simple.Transpose.Config(), (2, 3, 4), lambda v: v.transpose(0, 1, 4, 3, 2)),
    (simple.Transpose.Config((3, 2)), (2, 3), lambda v: v.transpose(0, 1, 3, 2)),
    (simple.SwapAxes.Config(2, -1), (2, 3, 4), lambda v: v.swapaxes(2, 4)),
    (simple.MoveAxis.Config(2, -1), (2, 3, 4), lambda v: np.moveaxis(v, 2, -1)),
    (simple.Squeeze.Config(), (1, 3, 1), lambda v: v[:, :, 0, :, 0]),
    (simple.Squeeze.Config(axis=-1), (1, 3, 1), lambda v: v[..., 0]),
    (
        simple.EinopsRearrange.Config("(h d) -> d h", {"h": 2}),
        (6,),
        lambda v: v.reshape(*v.shape[:2], 2, 3).swapaxes(2, 3),
    ),
]
IDS = [type(c[0]).__qualname__.split(".")[0] + str(i) for i, c in enumerate(CASES)]


@pytest.mark.parametrize(("config", "shape", "fn"), CASES, ids=IDS)
def test_values_and_shapes(config, shape, fn) -> None:
    v = np.arange(math.prod(shape) * 2, dtype=np.float32).reshape(1, 2, *shape)
    layer = config.make()
    y = layer.apply({}, Sequence.from_values(jnp.asarray(v)))
    np.testing.assert_array_equal(y.values, fn(v))
    assert y.channel_shape == layer.get_output_shape(shape)
    assert isinstance(y, MaskedSequence)


# One contract run per class.
_FIRST = {type(c[0]): c[:2] for c in reversed(CASES)}


@pytest.mark.parametrize(
    ("config", "shape"), list(_FIRST.values()), ids=[t.__qualname__ for t in _FIRST]
)
def test_contract(verify, config, shape) -> None:
    verify(
        config,
        testing.random_sequence(2, 5, *shape, seed=8),
        rf=isinstance(config, simple.Reshape.Config),
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: simple.Slice.Config([1]).make().get_output_shape((2, 3)), "one non-None entry"),
        (lambda: simple.Reshape.Config((4,)).make().get_output_shape((2, 3)), "as many elements"),
        (lambda: simple.ExpandDims.Config(4).make().get_output_shape((2,)), "out of range"),
        (lambda: simple.Transpose.Config((1, 2)), "batch or time"),
        (lambda: simple.Transpose.Config((2, 4)).make().get_output_shape((2, 3)), "permutation"),
        (lambda: simple.SwapAxes.Config(0, 2), "batch or time"),
        (lambda: simple.MoveAxis.Config((2, 3), 2), "as many destinations"),
        (lambda: simple.Squeeze.Config(axis=2).make().get_output_shape((3,)), "size-1"),
        (lambda: simple.EinopsRearrange.Config("a b"), "->"),
        (lambda: simple.EinopsRearrange.Config("time -> time"), "reserved"),
    ],
)
def test_validation_errors(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def _global_input() -> Sequence:
    # Row 0 has 4 valid frames, row 1 has 3; channels [2].
    values = jnp.arange(16.0).reshape(2, 4, 2)
    return Sequence.from_lengths(values, [4, 3])


def test_global_reshape_values_and_mask() -> None:
    layer = simple.GlobalReshape.Config((2, 4)).make()
    x = _global_input()
    y = layer.apply({}, x)
    np.testing.assert_array_equal(y.values, np.asarray(x.values).reshape(2, 2, 4))
    # An output frame is valid only if all of its inputs are.
    np.testing.assert_array_equal(y.mask, [[True, True], [True, False]])
    assert layer.get_output_shape((2,)) == (4,)


@pytest.mark.parametrize(
    ("ceil_mode", "mask"), [(False, [[1, 1], [1, 0]]), (True, [[1, 1], [1, 1]])]
)
def test_global_einops_rearrange(ceil_mode: bool, mask) -> None:
    layer = simple.GlobalEinopsRearrange.Config("(t k) c -> t (k c)", {"k": 2}, ceil_mode).make()
    x = _global_input()
    y = layer.apply({}, x)
    expected = np.asarray(x.mask_invalid().values).reshape(2, 2, 4)
    np.testing.assert_array_equal(y.values, expected)
    np.testing.assert_array_equal(y.mask, np.asarray(mask, bool))
    assert layer.get_output_shape((2,)) == (4,)


@pytest.mark.parametrize(
    "config",
    [simple.GlobalReshape.Config((2, 4)), simple.GlobalEinopsRearrange.Config("t c -> c t")],
)
def test_global_layers_do_not_step(config) -> None:
    layer = config.make()
    assert not layer.supports_step
    assert layer.receptive_field == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="does not support step"):
        layer.apply({}, _global_input(), (), training=False, method="step")
