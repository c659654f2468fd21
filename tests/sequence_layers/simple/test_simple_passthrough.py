"""Pass-through layers: identity values plus their side effect."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import MaskedSequence, Sequence, simple, testing

X = testing.random_sequence(2, 7, 3, seed=1)


@pytest.mark.parametrize(
    "config",
    [
        simple.Identity.Config(),
        simple.MaskInvalid.Config(),
        simple.StopGradient.Config(),
        simple.GradientClipping.Config(0.5),
        simple.OptimizationBarrier.Config(apply_to_mask=True),
        simple.ApplySharding.Config(values_sharding=("data", None, None)),
        simple.CheckpointName.Config("activations"),
        simple.Logging.Config("test"),
        simple.Emit.Config(),
        simple.NamedEmit.Config("tap"),
    ],
    ids=lambda c: type(c).__qualname__.split(".")[0],
)
def test_contract_and_identity(verify, config) -> None:
    layer, y = verify(config, X, rf=isinstance(config, simple.Identity.Config))
    np.testing.assert_array_equal(y.values, X.mask_invalid().values)
    np.testing.assert_array_equal(y.mask, X.mask)
    assert layer.get_output_spec(X.channel_spec) == X.channel_spec


def test_mask_invalid_zeroes_padding() -> None:
    x = Sequence(jnp.full((1, 3, 2), jnp.nan), jnp.array([[True, False, False]]))
    x = Sequence(x.values.at[:, 0].set(1.0), x.mask)
    y = simple.MaskInvalid.Config().make().apply({}, x)
    assert isinstance(y, MaskedSequence)
    np.testing.assert_array_equal(y.values, [[[1, 1], [0, 0], [0, 0]]])


def _input_grad(config, values: jax.Array) -> jax.Array:
    layer = config.make()

    def loss(v: jax.Array) -> jax.Array:
        return jnp.sum(3.0 * layer.apply({}, Sequence.from_values(v)).values)

    return jax.grad(loss)(values)


@pytest.mark.parametrize(
    ("config", "expected_grad"),
    [
        (simple.Identity.Config(), 3.0),
        (simple.StopGradient.Config(), 0.0),
        (simple.GradientClipping.Config(1.5), 1.5),
        (simple.CheckpointName.Config("a"), 3.0),
    ],
)
def test_gradients(config, expected_grad: float) -> None:
    grad = _input_grad(config, jnp.ones((1, 2, 2)))
    np.testing.assert_allclose(grad, np.full((1, 2, 2), expected_grad))


def test_gradient_clipping_rejects_non_positive() -> None:
    with pytest.raises(ValueError, match="clip_value > 0"):
        simple.GradientClipping.Config(0.0)


def test_checkpoint_name_is_in_the_jaxpr() -> None:
    layer = simple.CheckpointName.Config("my_tag").make()
    jaxpr = jax.make_jaxpr(lambda v: layer.apply({}, Sequence.from_values(v)).values)(
        jnp.ones((1, 2, 2))
    )
    assert "my_tag" in str(jaxpr)


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_apply_sharding_under_a_mesh(axis_type) -> None:
    mesh = jax.make_mesh((1,), ("data",), axis_types=(axis_type,))
    layer = simple.ApplySharding.Config(values_sharding=("data", None, None)).make()
    with jax.set_mesh(mesh):
        y = jax.jit(lambda x: layer.apply({}, x))(X)
    np.testing.assert_array_equal(y.values, X.values)


def test_logging_logs_specs_and_values(caplog) -> None:
    layer = simple.Logging.Config("tap").make()
    with caplog.at_level(logging.INFO, logger="sequence_layers"):
        layer.apply({}, X)
        layer.apply({}, X[:, :1], (), training=False, method="step")
        layer.get_initial_state(2, X.channel_spec, training=False)
    text = caplog.text
    assert "tap layer()" in text and "tap step()" in text and "tap get_initial_state()" in text
    assert "float32" in text and "batch_size=2" in text

    caplog.clear()
    dumping = simple.Logging.Config("dump", dump_tensors=True).make()
    with caplog.at_level(logging.INFO, logger="sequence_layers"):
        dumping.apply({}, Sequence.from_values(jnp.full((1, 1, 1), 7.25)))
    assert "7.25" in caplog.text


def test_emits() -> None:
    emit = simple.Emit.Config().make()
    y, emits = emit.apply({}, X, training=False, method="layer_with_emits")
    assert emits is X and y is X
    named = simple.NamedEmit.Config("tap").make()
    y, state, emits = named.apply({}, X, (), training=False, method="step_with_emits")
    assert state == () and emits == {"tap": X}
