"""Random inputs and numpy input preparation for `verify_contract`.

Inputs are prepared and outputs compared in numpy: every eager jnp op on a
new shape costs an XLA compile, which dominates small tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sequence_layers.sequence import MASK_DTYPE, MaskedSequence, Sequence
from sequence_layers.types import Constants


def random_sequence(
    *dims: int,
    dtype: Any = jnp.float32,
    random_mask: bool = False,
    random_lengths: bool = True,
    low: int = 0,
    high: int = 10,
    low_length: int = 0,
    high_length: int | None = None,
    seed: int = 0,
) -> Sequence:
    """A random, already masked `Sequence [dims[0], dims[1], *dims[2:]]`.

    Values are standard normal (complex: normal + 1j * normal; integers:
    uniform in `[low, high)`). Each row is valid for a random prefix of length
    in `[low_length, high_length)` (default `[low_length, t]`), or for all
    frames with `random_lengths=False`; `random_mask=True` instead draws every
    frame's validity independently with probability 1/2.
    """
    if len(dims) < 2:
        raise ValueError(f"random_sequence needs at least [batch, time] dims, got {dims=}.")
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        values = rng.normal(size=dims) + 1j * rng.normal(size=dims)
    elif jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_:
        values = rng.integers(low, high, size=dims)
    else:
        values = rng.normal(size=dims)
    batch, time = dims[0], dims[1]
    if random_mask:
        mask = rng.uniform(size=(batch, time)) > 0.5
    else:
        if random_lengths and time > 0:
            top = time + 1 if high_length is None else high_length
            lengths = rng.integers(low_length, top, size=batch)
        else:
            lengths = np.full(batch, time)
        mask = np.arange(time)[np.newaxis, :] < lengths[:, np.newaxis]
    values = np.where(_expand(mask, values), values, 0).astype(dtype)
    return MaskedSequence(jnp.asarray(values), jnp.asarray(mask, MASK_DTYPE))


# Numpy helpers -----------------------------------------------------------------


def _np(a: Any) -> np.ndarray:
    """A numpy array that numpy can do arithmetic on (bf16/f16 -> f32)."""
    a = np.asarray(a)
    if a.dtype.kind == "V" or (a.dtype.kind == "f" and a.dtype.itemsize < 4):
        return a.astype(np.float32)
    if a.dtype.kind not in "fcb":
        return a.astype(np.float64)
    return a


def _expand(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
    return mask.reshape(mask.shape + (1,) * (values.ndim - 2))


def _fill_invalid(values: np.ndarray, mask: np.ndarray, fill: Any) -> np.ndarray:
    return np.where(_expand(mask, values), values, np.asarray(fill).astype(values.dtype))


def _is_inexact(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _invalid_fill(dtype: Any) -> Any:
    """NaN for inexact dtypes (to catch leaks), 0 otherwise."""
    return np.nan if _is_inexact(dtype) else 0


def _np_sequence(x: Sequence) -> Sequence:
    """`x` with numpy arrays and invalid frames zeroed."""
    values, mask = np.asarray(x.values), np.asarray(x.mask).astype(bool)
    return MaskedSequence(_fill_invalid(values, mask, 0), mask)


def _np_pad_time(x: Sequence, frames: int, fill: Any = 0, valid: bool = False) -> Sequence:
    """Appends `frames` frames of `fill` (masked `valid`) in numpy."""
    if frames <= 0:
        return x
    values, mask = np.asarray(x.values), np.asarray(x.mask)
    pad_values = np.full((values.shape[0], frames, *values.shape[2:]), fill, values.dtype)
    pad_mask = np.full((mask.shape[0], frames), valid, bool)
    keeps_masked = isinstance(x, MaskedSequence) and (valid or not np.any(pad_values != 0))
    return (MaskedSequence if keeps_masked else Sequence)(
        np.concatenate([values, pad_values], axis=1), np.concatenate([mask, pad_mask], axis=1)
    )


def _np_nan_pad(x: Sequence, frames: int) -> Sequence:
    """Appends `frames` invalid frames and fills every invalid value with NaN
    (0 for integer dtypes)."""
    x = _np_pad_time(x, frames)
    values, mask = np.asarray(x.values), np.asarray(x.mask)
    fill = _invalid_fill(values.dtype)
    return (MaskedSequence if fill == 0 else Sequence)(_fill_invalid(values, mask, fill), mask)


def _np_pad_to_multiple(x: Sequence, block: int) -> Sequence:
    return _np_pad_time(x, (-x.shape[1]) % block)


def _garbage_rows(tree: Any) -> Any:
    """Adds a garbage batch row above and below every array and Sequence:
    NaN (max int for integers) values with an all-valid mask."""

    def pad_rows(a: Any) -> np.ndarray:
        a = np.asarray(a)
        if _is_inexact(a.dtype):
            fill: Any = np.nan
        elif jnp.issubdtype(a.dtype, jnp.integer):
            fill = np.iinfo(a.dtype).max
        else:
            fill = 0
        row = np.full((1, *a.shape[1:]), fill, a.dtype)
        return np.concatenate([row, a, row], axis=0)

    def pad(x: Any) -> Any:
        if isinstance(x, Sequence):
            mask = np.asarray(x.mask)
            row = np.ones((1, mask.shape[1]), bool)
            return Sequence(pad_rows(x.values), np.concatenate([row, mask, row], axis=0))
        if hasattr(x, "shape") and np.ndim(x) >= 1:
            return pad_rows(x)
        return x

    return jax.tree.map(pad, tree, is_leaf=lambda v: isinstance(v, Sequence))


def _map_sequence_constants(constants: Constants | None, fn: Callable[[Sequence], Any]) -> Any:
    if constants is None:
        return None
    return {k: fn(v) if isinstance(v, Sequence) else v for k, v in constants.items()}
