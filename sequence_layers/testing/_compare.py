"""Sequence comparisons, tolerances and the standard dtype configurations."""

from __future__ import annotations

from typing import Any, NoReturn

import jax.numpy as jnp
import numpy as np

from sequence_layers.sequence import Sequence
from sequence_layers.testing._inputs import _fill_invalid, _np


def standard_dtype_configs(
    *,
    param: bool | None = None,
    input: bool | None = None,
    compute: bool | None = None,
    include_default: bool = True,
    expected: bool = False,
    named: bool = False,
) -> list[dict[str, Any]]:
    """The dtype combinations every dtype-aware layer is tested with.

    Each config maps `param_dtype`, `input_dtype`, `compute_dtype` (in that
    order) to a dtype: (f32, f32, None), (bf16, bf16, bf16), (f32, bf16, bf16),
    (bf16, f32, None), (f32, f32, bf16). Setting any of `param`, `input`,
    `compute` keeps only those keys (deduplicated). `expected=True` adds
    `expected_dtype`, the promoted output dtype; `named=True` adds a
    `testcase_name` such as `p-fp32_i-bf16_c-bf16`.
    """
    f32, bf16 = jnp.float32, jnp.bfloat16
    rows = [(f32, f32, None)] if include_default else []
    rows += [(bf16, bf16, bf16), (f32, bf16, bf16), (bf16, f32, None), (f32, f32, bf16)]
    if param is None and input is None and compute is None:
        param = input = compute = True
    keep = {"param_dtype": param, "input_dtype": input, "compute_dtype": compute}
    short = {f32: "fp32", bf16: "bf16", None: "None"}
    seen: set[tuple[Any, ...]] = set()
    configs: list[dict[str, Any]] = []
    for row in rows:
        full = dict(zip(("param_dtype", "input_dtype", "compute_dtype"), row, strict=True))
        config = {k: v for k, v in full.items() if keep[k]}
        key = tuple(config.values())
        if key in seen:
            continue
        seen.add(key)
        if expected:
            p, i, c = row
            config["expected_dtype"] = (
                jnp.dtype(c) if c is not None else jnp.promote_types(p, i)
            ).type
        if named:
            name = "_".join(f"{k[0]}-{short[v]}" for k, v in config.items() if k in keep)
            config = {"testcase_name": name, **config}
        configs.append(config)
    return configs


def get_grad_tols(param_dtype: Any, compute_dtype: Any = None) -> dict[str, float]:
    """Gradient tolerances for `verify_contract(**get_grad_tols(...))`:
    1e-5 when everything runs in float32 (or wider), 1e-1 otherwise."""
    dtypes = [d for d in (param_dtype, compute_dtype) if d is not None]
    tol = 1e-5 if all(_is_full_precision(d) for d in dtypes) else 1e-1
    return {"grad_rtol": tol, "grad_atol": tol}


def _is_full_precision(dtype: Any) -> bool:
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        return True
    return jnp.finfo(dtype).bits >= 32


# Tolerances ------------------------------------------------------------------
#
# The policy, written once: floats are compared with BOTH a relative and an
# absolute tolerance, the absolute one scaled to the magnitude of the values.
# `rtol` alone fails on values near zero: the same XLA program on Intel and AMD
# CPUs (different vector widths, FMA contraction and reduction orders) gives
# results a few float32 ulps of the *inputs* apart, which is a huge relative
# error on an output that happens to be 1e-8. The error a float computation
# makes is relative to the magnitude of what it combined, so the absolute
# tolerance is `rtol * scale`, where `scale` defaults to the largest |expected|
# (pass the inputs' magnitude instead when the result cancels large terms).

# Relative tolerance per dtype: float32 ~ 80 ulps, half-precision types ~ 2-3
# ulps of bf16, float64 for NumPy oracles.
_RTOL = {2: 2e-2, 4: 1e-5, 8: 1e-10}


def tolerances(dtype: Any = np.float32, scale: float = 1.0) -> dict[str, float]:
    """`{"rtol", "atol"}` for comparing values of `dtype` of magnitude ~`scale`.

    >>> tolerances(np.float32, scale=10.0)
    {'rtol': 1e-05, 'atol': 0.0001}
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        return {"rtol": 0.0, "atol": 0.0}
    # finfo of a complex dtype describes its real part (complex64 -> 32 bits).
    rtol = _RTOL.get(jnp.finfo(dtype).bits // 8, 1e-5)
    return {"rtol": rtol, "atol": rtol * max(float(scale), np.finfo(np.float32).tiny)}


def assert_allclose(
    actual: Any,
    desired: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    scale: float | None = None,
    dtype: Any = None,
    err_msg: str = "",
) -> None:
    """`np.testing.assert_allclose` under the tolerance policy above.

    Defaults come from `tolerances(dtype, scale)`: `dtype` defaults to the
    narrower float dtype of the two arrays (exact for integers), `scale` to
    max |desired| (at least 1e-3, so all-zero expectations still get a
    float-sized tolerance). An explicit `rtol` also scales the default `atol`
    (`atol = rtol * scale`).
    """
    if dtype is None:
        # The narrower float of the two bounds the precision of the result
        # (a float32 result against a float64 NumPy oracle is a float32 check).
        floats = [
            jnp.dtype(np.asarray(v).dtype)
            for v in (actual, desired)
            if jnp.issubdtype(np.asarray(v).dtype, jnp.inexact)
        ]
        dtype = min(floats, key=lambda t: jnp.finfo(t).bits) if floats else np.int64
    a, d = _np(actual), _np(desired)
    if scale is None:
        finite = np.abs(d[np.isfinite(d)]) if d.size else np.zeros(0)
        scale = max(float(finite.max()) if finite.size else 0.0, 1e-3)
    tol = tolerances(dtype, scale)
    if rtol is not None:
        tol = {"rtol": rtol, "atol": rtol * scale}
    if atol is not None:
        tol["atol"] = atol
    np.testing.assert_allclose(a, d, err_msg=err_msg, equal_nan=True, **tol)


# Comparisons -----------------------------------------------------------------


def _rows(mask: np.ndarray) -> str:
    return "\n".join("    " + "".join("1" if v else "." for v in row) for row in mask)


def _frame(values: np.ndarray, b: int, t: int) -> str:
    flat = values[b, t].reshape(-1)
    text = np.array2string(flat[:6], precision=5, separator=", ")
    return text + (" ..." if flat.size > 6 else "")


def _compare_sequences(
    a: Sequence,
    b: Sequence,
    *,
    rtol: float,
    atol: float,
    names: tuple[str, str] = ("a", "b"),
) -> str | None:
    """None if `a` and `b` agree (masks exactly, values on valid frames up to
    tolerance, the shorter padded with invalid frames), else what differs."""
    na, nb = names
    av, am = _np(a.values), np.asarray(a.mask).astype(bool)
    bv, bm = _np(b.values), np.asarray(b.mask).astype(bool)
    if av.shape[0] != bv.shape[0] or av.shape[2:] != bv.shape[2:]:
        return f"shapes differ: {na}.shape={av.shape}, {nb}.shape={bv.shape}."
    t = max(av.shape[1], bv.shape[1])

    def pad(v: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        extra = t - v.shape[1]
        v = np.concatenate([v, np.zeros((v.shape[0], extra, *v.shape[2:]), v.dtype)], axis=1)
        m = np.concatenate([m, np.zeros((m.shape[0], extra), bool)], axis=1)
        return _fill_invalid(v, m, 0), m

    (av, am), (bv, bm) = pad(av, am), pad(bv, bm)
    if not np.array_equal(am, bm):
        where = [tuple(int(i) for i in p) for p in np.argwhere(am != bm)[:8]]
        return (
            f"masks differ at (batch, time) {where} ('1' = valid, padded to a common length):\n"
            f"  {na}.mask:\n{_rows(am)}\n  {nb}.mask:\n{_rows(bm)}"
        )
    close = np.isclose(av, bv, rtol=rtol, atol=atol, equal_nan=True)
    bad = ~close.reshape((*close.shape[:2], -1)).all(axis=-1)
    if not bad.any():
        return None
    with np.errstate(invalid="ignore"):
        diff = np.abs(av - bv)
    finite = diff[np.isfinite(diff)]
    max_diff = float(finite.max()) if finite.size else float("nan")
    lines = [
        f"values differ on {int(bad.sum())} valid frame(s) (rtol={rtol}, atol={atol}, "
        f"max finite |diff|={max_diff:.3g}, shape={av.shape}):"
    ]
    for bi, ti in np.argwhere(bad)[:5]:
        lines.append(f"  [b={bi}, t={ti}] {na}={_frame(av, bi, ti)}  {nb}={_frame(bv, bi, ti)}")
    return "\n".join(lines)


def assert_sequences_close(
    a: Sequence,
    b: Sequence,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    *,
    msg: str = "",
) -> None:
    """Asserts `a` and `b` have identical masks and close values on valid
    frames (invalid frames are ignored; the shorter is padded with invalid
    frames, so extra trailing frames must be invalid)."""
    problem = _compare_sequences(a, b, rtol=rtol, atol=atol)
    if problem is not None:
        raise AssertionError(f"{msg}: {problem}" if msg else problem)


def _fail(layer_name: str, check: str, detail: str) -> NoReturn:
    raise AssertionError(f"verify_contract [{check}] failed for {layer_name}:\n{detail}")
