"""Dense, DenseShaped, EinsumDense."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import MaskedSequence, Sequence, dense, testing

X = testing.random_sequence(2, 5, 3, seed=20)
F32_TOLS = {"grad_rtol": 1e-5, "grad_atol": 1e-5}


def _verify(config, x: Sequence, **kwargs):
    layer = testing.init_and_bind(config, x, randomize=True)
    return layer, testing.verify_contract(layer, x, **(F32_TOLS | kwargs))


def _valid(x: Sequence, values) -> np.ndarray:
    return np.where(np.asarray(x.mask)[..., None], np.asarray(values, np.float32), 0)


def test_dense_values_and_params() -> None:
    layer, y = _verify(dense.Dense.Config(4, activation=jax.nn.relu), X)
    params = layer.variables["params"]
    assert jax.tree.map(jnp.shape, params) == {"kernel": (3, 4), "bias": (4,)}
    expected = np.maximum(np.asarray(X.values) @ params["kernel"] + params["bias"], 0)
    np.testing.assert_allclose(y.values, _valid(X, expected), rtol=1e-5, atol=1e-6)


def test_dense_maps_the_last_axis_of_any_rank() -> None:
    x = testing.random_sequence(2, 4, 2, 3, seed=21)
    layer, y = _verify(dense.Dense.Config(5, use_bias=False), x, test_receptive_field=False)
    assert y.channel_shape == (2, 5)
    # No bias and no activation: zero frames stay zero.
    assert isinstance(layer.layer(x, training=False), MaskedSequence)


def test_params_created_by_layer_serve_step() -> None:
    layer = dense.Dense.Config(4).make()
    variables = layer.init(jax.random.PRNGKey(0), X)
    step_variables = layer.init(jax.random.PRNGKey(0), X[:, :1], (), training=False, method="step")
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, step_variables)
    y, _ = layer.apply(variables, X, (), training=False, method="step")
    testing.assert_allclose(y.values, layer.apply(variables, X).values)


def test_nan_padding_does_not_reach_kernel_gradients() -> None:
    layer = dense.Dense.Config(2).make()
    variables = layer.init(jax.random.PRNGKey(0), X)
    padded = X.mask_invalid(jnp.nan)

    def loss(params):
        y = layer.apply({"params": params}, padded)
        return jnp.sum(jnp.where(y.mask[..., None], y.values, 0.0))

    grads = jax.grad(loss)(variables["params"])
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# (param_dtype, input dtype, compute_dtype, expected output dtype)
DTYPES = [
    (jnp.float32, jnp.float32, None, jnp.float32),
    (jnp.bfloat16, jnp.bfloat16, None, jnp.bfloat16),
    (jnp.float32, jnp.bfloat16, None, jnp.float32),
    (jnp.bfloat16, jnp.float32, jnp.bfloat16, jnp.bfloat16),
    (jnp.float32, jnp.float32, jnp.bfloat16, jnp.bfloat16),
]


@pytest.mark.parametrize(("param_dtype", "input_dtype", "compute_dtype", "expected"), DTYPES)
def test_dtypes(param_dtype, input_dtype, compute_dtype, expected) -> None:
    config = dense.Dense.Config(4, param_dtype=param_dtype, compute_dtype=compute_dtype)
    x = X.astype(input_dtype)
    layer = config.make()
    variables = layer.init(jax.random.PRNGKey(0), x)
    assert variables["params"]["kernel"].dtype == param_dtype
    assert layer.apply(variables, x).dtype == expected == layer.get_output_dtype(input_dtype)


def test_bfloat16_contract() -> None:
    config = dense.Dense.Config(4, param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
    _verify(config, X.astype(jnp.bfloat16), rtol=1e-2, atol=1e-2, grad_rtol=1e-1, grad_atol=1e-1)


@pytest.mark.parametrize(("in_shape", "out_shape"), [((2, 3), (4,)), ((3,), ()), ((), (2, 2))])
def test_dense_shaped(in_shape, out_shape) -> None:
    x = testing.random_sequence(2, 4, *in_shape, seed=22)
    config = dense.DenseShaped.Config(out_shape)
    if in_shape == (2, 3):
        layer, y = _verify(config, x, test_receptive_field=False)
    else:
        layer = testing.init_and_bind(config, x, randomize=True)
        y = layer.layer(x, training=False).mask_invalid()
    params = layer.variables["params"]
    kernel_shape = (in_shape or (1,)) + (out_shape or (1,))
    assert params["kernel"].shape == kernel_shape and params["bias"].shape == (out_shape or (1,))
    flat_x = np.asarray(x.values).reshape(2, 4, -1)
    flat_k = np.asarray(params["kernel"]).reshape(flat_x.shape[-1], -1)
    expected = (flat_x @ flat_k + np.asarray(params["bias"]).reshape(-1)).reshape(2, 4, *out_shape)
    mask = np.asarray(x.mask).reshape(2, 4, *([1] * len(out_shape)))
    np.testing.assert_allclose(y.values, np.where(mask, expected, 0), rtol=1e-5, atol=1e-5)


def test_einsum_dense_docstring_example() -> None:
    x = testing.random_sequence(2, 4, 2, 3, 5, seed=23)
    config = dense.EinsumDense.Config("...abc,bd->...bd", (None, 6), bias_axes="d")
    layer, y = _verify(config, x, test_receptive_field=False)
    params = layer.variables["params"]
    assert jax.tree.map(jnp.shape, params) == {"kernel": (3, 6), "bias": (6,)}
    expected = np.einsum("xyabc,bd->xybd", np.asarray(x.values), params["kernel"])
    expected = expected + np.asarray(params["bias"])
    mask = np.asarray(x.mask)[..., None, None]
    np.testing.assert_allclose(y.values, np.where(mask, expected, 0), rtol=1e-5, atol=1e-5)


def test_einsum_dense_bias_spans_trailing_axes() -> None:
    x = testing.random_sequence(2, 3, 4, seed=24)
    config = dense.EinsumDense.Config("...a,abc->...bc", (2, 5), bias_axes="b")
    layer = testing.init_and_bind(config, x)
    assert layer.variables["params"]["bias"].shape == (2, 1)
    assert layer.layer(x, training=False).channel_shape == (2, 5)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: dense.Dense.Config(0), "features > 0"),
        (lambda: dense.Dense.Config(2).make().get_output_shape(()), "at least one channel"),
        (lambda: dense.Dense.Config(2, quantization_provider=object()), "not supported"),
        (
            lambda: dense.EinsumDense.Config("ab,bc->ac", (2,)).make().get_output_shape((2,)),
            "'...'",
        ),
        (
            lambda: dense.EinsumDense.Config("...a,ab->...b", (2,)).make().get_output_shape((2, 3)),
            "does not match",
        ),
        (
            lambda: dense.EinsumDense.Config("...a,ab->...a", (3,)).make().get_output_shape((2,)),
            "is 2 in the input",
        ),
        (
            lambda: dense.EinsumDense.Config("...a,ac->...b", (3,)).make().get_output_shape((2,)),
            "neither input nor output",
        ),
        (
            lambda: (
                dense.EinsumDense.Config("...a,ab->...b", (3,), "c").make().get_output_shape((2,))
            ),
            "bias_axes",
        ),
    ],
)
def test_validation_errors(make, match: str) -> None:
    with pytest.raises((ValueError, NotImplementedError), match=match):
        make()


def test_kernel_sharding_boxes_the_kernel() -> None:
    layer = dense.Dense.Config(4, kernel_sharding=(None, "model")).make()
    variables = layer.init(jax.random.PRNGKey(0), X)
    kernel = variables["params"]["kernel"]
    assert isinstance(kernel, nn.Partitioned) and kernel.names == (None, "model")
    y = layer.apply(variables, X)
    assert y.channel_shape == (4,)


def test_einsum_factory_replaces_jnp_einsum() -> None:
    calls: list[str] = []

    def factory():
        def einsum(equation: str, *operands):
            calls.append(equation)
            return jnp.einsum(equation, *operands)

        return einsum

    layer = dense.Dense.Config(2, einsum_factory=factory).make()
    variables = layer.init(jax.random.PRNGKey(0), X)
    reference = dense.Dense.Config(2).make().apply(variables, X)
    testing.assert_allclose(layer.apply(variables, X).values, reference.values)
    assert calls and calls[-1] == "...a,ab->...b"
