"""Shared pieces of the combinators: how parallel outputs are combined, how
emits are keyed, how constants and parameter scopes are handed to children.

Kept apart from `combinators.py` so the single-child wrappers
(`combinators_wrappers.py`) can use them without importing `Serial`.
"""

from __future__ import annotations

import enum
import functools
import math
import operator
from collections.abc import Iterable
from collections.abc import Sequence as PySequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers.sequence import Sequence
from sequence_layers.types import Constants, Emits, ReceptiveField, SequenceLayerConfig

__all__ = [
    "CombinationMode",
    "as_combination_mode",
    "child_constants",
    "combine_output_dtype",
    "combine_output_shape",
    "combine_sequences",
    "insert_with_unique_key",
    "mirror_receptive_field_per_step",
    "setup_shared_scope",
    "split_channels",
    "tuple_of_configs",
]


@enum.unique
class CombinationMode(enum.Enum):
    """How `Parallel`, `ParallelChannels` and `Bidirectional` merge their
    branches. Channel shapes broadcast first (missing leading dims count as 1).

    Channel shapes `x=(5,)`, `y=(3, 5)` give: STACK `(2, 3, 5)` (new leading
    channel axis), CONCAT `(3, 10)` (last axis), ADD / MEAN / PRODUCT `(3, 5)`.
    """

    STACK = 1
    CONCAT = 2
    ADD = 3
    MEAN = 4
    PRODUCT = 5


def as_combination_mode(mode: CombinationMode | str) -> CombinationMode:
    """Accepts the enum or its name (`'add'`, `'CONCAT'`)."""
    if isinstance(mode, CombinationMode):
        return mode
    try:
        return CombinationMode[str(mode).upper()]
    except KeyError:
        valid = [m.name.lower() for m in CombinationMode]
        raise ValueError(f"Unknown combination {mode!r}; expected one of {valid}.") from None


def _left_pad_rank(shapes: PySequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    rank = max(len(s) for s in shapes)
    return [(1,) * (rank - len(s)) + tuple(s) for s in shapes]


def combine_output_shape(
    mode: CombinationMode, shapes: PySequence[tuple[int, ...]]
) -> tuple[int, ...]:
    """Channel shape of `combine_sequences(mode, ...)` for these channel shapes."""
    shapes = [tuple(int(d) for d in s) for s in shapes]
    try:
        match mode:
            case CombinationMode.STACK:
                return (len(shapes), *jnp.broadcast_shapes(*_left_pad_rank(shapes)))
            case CombinationMode.CONCAT:
                # Scalar channels concatenate as if they had one channel.
                padded = _left_pad_rank([s if s else (1,) for s in shapes])
                outer = jnp.broadcast_shapes(*(s[:-1] for s in padded))
                return (*outer, sum(s[-1] for s in padded))
            case CombinationMode.ADD | CombinationMode.MEAN | CombinationMode.PRODUCT:
                return tuple(jnp.broadcast_shapes(*_left_pad_rank(shapes)))
    except ValueError as e:
        raise ValueError(
            f"Cannot combine channel shapes {shapes} with {mode.name}: {e}. "
            "Branch outputs must broadcast against each other."
        ) from e
    raise AssertionError(mode)


def combine_output_dtype(dtypes: Iterable[Any]) -> Any:
    return functools.reduce(jnp.result_type, dtypes)


def combine_sequences(mode: CombinationMode, seqs: PySequence[Sequence]) -> Sequence:
    """Combines branch outputs `[b, t, *c_i]` into one `[b, t, *c]`; a frame is
    valid only where every branch is valid."""
    if len({s.shape[:2] for s in seqs}) != 1:
        raise ValueError(
            f"Branches disagree on [batch, time]: {[s.shape[:2] for s in seqs]}. "
            "Parallel branches must have the same output ratio."
        )
    mask = seqs[0].mask
    for s in seqs[1:]:
        if s.mask is not mask:
            mask = jnp.logical_and(mask, s.mask)
    out_shape = combine_output_shape(mode, [s.channel_shape for s in seqs])
    b, t = seqs[0].shape[:2]
    if mode is CombinationMode.PRODUCT:
        # A branch's invalid frames may hold NaN; its product with another
        # branch would put NaN into that branch's gradients (NaN * 0).
        seqs = [s.mask_invalid() for s in seqs]
    rank = max(len(s.channel_shape) for s in seqs)

    def expand(v: jax.Array) -> jax.Array:
        return v.reshape((b, t) + (1,) * (rank + 2 - v.ndim) + v.shape[2:])

    values = [expand(s.values) for s in seqs]
    match mode:
        case CombinationMode.STACK:
            full = (b, t, *out_shape[1:])
            y = jnp.stack([jnp.broadcast_to(v, full) for v in values], axis=2)
        case CombinationMode.CONCAT:
            if rank == 0:
                values = [v[..., None] for v in values]
            outer = (b, t, *out_shape[:-1])
            y = jnp.concatenate(
                [jnp.broadcast_to(v, outer + v.shape[-1:]) for v in values], axis=-1
            )
        case CombinationMode.ADD:
            y = functools.reduce(operator.add, values)
        case CombinationMode.MEAN:
            y = functools.reduce(operator.add, values) / len(values)
        case CombinationMode.PRODUCT:
            y = functools.reduce(operator.mul, values)
    return Sequence(y, mask)


def split_channels(x: Sequence, num_groups: int) -> list[Sequence]:
    """Splits the last channel axis into `num_groups` equal parts, keeping the
    sequence type (a zero frame stays zero)."""
    parts = jnp.split(x.values, num_groups, axis=-1)
    return [type(x)(v, x.mask) for v in parts]


def insert_with_unique_key(emits: dict[str, Emits], key: str, value: Emits) -> str:
    """Inserts `value` under `key`, or `key_1`, `key_2`, ... if taken."""
    unique, i = key, 0
    while unique in emits:
        i += 1
        unique = f"{key}_{i}"
    emits[unique] = value
    return unique


def child_constants(constants: Constants | None) -> Constants | None:
    """A shallow copy per child, so one child rebinding a key never leaks into
    its siblings."""
    return None if constants is None else dict(constants)


def setup_shared_scope(
    parent: nn.Module, children: PySequence[nn.Module], share_scope: bool | tuple[bool, ...]
) -> None:
    """Merges the parameters of the children marked in `share_scope` into the
    parent's scope (no `layers_i` level in the parameter tree)."""
    flags = (share_scope,) * len(children) if isinstance(share_scope, bool) else share_scope
    if len(flags) != len(children):
        raise ValueError(
            f"share_scope has {len(flags)} entries for {len(children)} layers; pass one "
            "bool, or one per layer."
        )
    for child, share in zip(children, flags, strict=True):
        if share:
            nn.share_scope(parent, child)


def tuple_of_configs(layers: Any, field: str) -> tuple[SequenceLayerConfig, ...]:
    """Validates a list of child configs and returns it as a (hashable) tuple."""
    if isinstance(layers, SequenceLayerConfig):
        raise TypeError(f"{field} must be a list of layer configs, got a single {layers!r}.")
    layers = tuple(layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, SequenceLayerConfig):
            raise TypeError(
                f"{field}[{i}] must be a SequenceLayerConfig (e.g. sl.Dense.Config(...)), "
                f"got {type(layer).__name__}: {layer!r}."
            )
    return layers


def normalize_share_scope(share_scope: Any, num_layers: int) -> bool | tuple[bool, ...]:
    if isinstance(share_scope, bool):
        return share_scope
    flags = tuple(bool(s) for s in share_scope)
    if len(flags) != num_layers:
        raise ValueError(
            f"share_scope has {len(flags)} entries for {num_layers} layers; pass one bool, "
            "or one per layer."
        )
    return flags


def mirror_receptive_field_per_step(
    forward: dict[int, ReceptiveField], backward: dict[int, ReceptiveField]
) -> dict[int, ReceptiveField]:
    """Receptive field of a forward layer combined with a layer run on the
    time-reversed input: the backward field `(a, b)` becomes `(-b, -a)`."""
    n = math.lcm(len(forward), len(backward))
    result: dict[int, ReceptiveField] = {}
    for step in range(n):
        fwd = forward[step % len(forward)]
        bwd = backward[(n - step) % len(backward)]
        fields = [f for f in (fwd, None if bwd is None else (-bwd[1], -bwd[0])) if f is not None]
        result[step] = (min(f[0] for f in fields), max(f[1] for f in fields)) if fields else None
    return result
