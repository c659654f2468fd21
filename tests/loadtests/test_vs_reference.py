"""`bench_vs_reference` says which rows both libraries compile to the same
XLA program; `program_text` is what it compares."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from loadtests.vs_reference_worker import kernel_signature, program_text


def _program(fn: object, x: jax.Array) -> str:
    return program_text(jax.jit(fn).lower(x).compile().as_text())  # type: ignore[arg-type]


def scale_and_shift(x: jax.Array) -> jax.Array:
    return jnp.tanh(x * 2.0 + 1.0).sum(axis=-1)


def written_elsewhere(values: jax.Array) -> jax.Array:
    shifted = values * 2.0 + 1.0  # other names, other source lines
    return jnp.sum(jnp.tanh(shifted), axis=-1)


def test_the_same_program_written_twice_compares_equal_and_another_does_not() -> None:
    x = jnp.ones((4, 8))
    first = _program(scale_and_shift, x)
    assert first == _program(written_elsewhere, x)
    assert "metadata" not in first and "scale_and_shift" not in first
    assert first != _program(lambda v: jnp.tanh(v * 3.0 + 1.0).sum(axis=-1), x)
    assert first != _program(scale_and_shift, jnp.ones((4, 9)))


def test_programs_with_the_same_dots_and_other_elementwise_work_share_kernels() -> None:
    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))

    def plain(x: jax.Array) -> jax.Array:
        return x @ w

    def masked(x: jax.Array) -> jax.Array:
        return jnp.where(x.sum(axis=-1, keepdims=True) > 0, jnp.tanh(x @ w), 0.0)

    def wider(x: jax.Array) -> jax.Array:
        return x @ jnp.ones((8, 32))

    first, second = _program(plain, x), _program(masked, x)
    assert first != second
    assert kernel_signature(first) == kernel_signature(second)
    assert len(kernel_signature(first)) == 1
    assert kernel_signature(first) != kernel_signature(_program(wider, x))
