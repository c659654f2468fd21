"""Helpers shared by the simple layers (and `dense`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as PySequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sequence_layers import types
from sequence_layers.sequence import MaskedSequence, Sequence

# A per-dimension sharding annotation: mesh axis names (or None) per array
# dimension, as in `jax.sharding.PartitionSpec(*sharding)`.
Sharding = tuple[Any, ...] | None


class CheckedStep(types.SequenceLayer):
    """Decorates the inherited stateless `step` with `types.check_step`, so
    block alignment, output length, output spec and `supports_step` are
    enforced for every simple layer. List it first among the bases."""

    @types.check_step
    def step(
        self,
        x: Sequence,
        state: types.State,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, types.State]:
        return super().step(x, state, training=training, constants=constants)


def masked(x: Sequence) -> Sequence:
    """`x` with invalid frames zeroed, skipping the work when already masked.

    Layers with parameters call this first: the backward pass of a product
    with a NaN padding frame would put NaN into the parameter gradients even
    though the frame's own gradient is zero.
    """
    return x if isinstance(x, MaskedSequence) else x.mask_invalid()


def shard(x: jax.Array, sharding: Sharding) -> jax.Array:
    """Constrains `x` to `sharding` on the active mesh; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if sharding is None or mesh is None or mesh.empty:
        return x
    spec = jax.sharding.PartitionSpec(*sharding)
    if mesh.are_all_axes_explicit:
        # Explicit meshes treat constraints as assertions; move the data instead.
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def as_tuple(value: Any) -> Any:
    """Lists (also nested) as tuples, so configs stay hashable."""
    if isinstance(value, list | tuple):
        return tuple(as_tuple(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class HashableArray:
    """A constant array stored as nested tuples so a frozen config can hash it.

    Example:
        >>> HashableArray.from_array(np.eye(2)).to_array().shape
        (2, 2)
    """

    # The values as nested tuples (a bare scalar for rank 0).
    data: Any
    # The numpy dtype name, e.g. 'float32'.
    dtype: str

    @classmethod
    def from_array(cls, x: Any) -> HashableArray:
        if isinstance(x, HashableArray):
            return x
        array = np.asarray(x)
        return cls(as_tuple(array.tolist()), array.dtype.name)

    def to_array(self) -> np.ndarray:
        return np.asarray(self.data, dtype=np.dtype(self.dtype))


def normalize_axes(axes: int | PySequence[int] | None) -> tuple[int, ...] | None:
    """An int or sequence of axes as a tuple (None stays None)."""
    if axes is None:
        return None
    if isinstance(axes, int):
        return (axes,)
    return tuple(int(a) for a in axes)


def get_promoted_dtype(*dtypes: Any, dtype: Any = None, inexact: bool = True) -> Any:
    """The dtype `flax.linen.dtypes.promote_dtype` computes in: `dtype` if
    given, else the promotion of `dtypes` (at least float32 if `inexact` and
    they are all integers)."""
    if dtype is None:
        dtype = jnp.result_type(*(d for d in dtypes if d is not None))
        if inexact and not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    if inexact and not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(f"A floating or complex compute dtype is needed, got {dtype}.")
    return jnp.dtype(dtype)
