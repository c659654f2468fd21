"""Receptive-field measurement: the Jacobian of `layer` against the declared
`receptive_field_per_step`."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sequence_layers.sequence import MaskedSequence, Sequence
from sequence_layers.testing._compare import _fail, _rows
from sequence_layers.testing._harness import _Harness
from sequence_layers.testing._inputs import _is_inexact, _map_sequence_constants
from sequence_layers.types import (
    Constants,
    ReceptiveField,
    SequenceLayer,
    union_receptive_fields,
)


def _dependencies(
    h: _Harness, variables: Any, x: Sequence, constants: Constants | None
) -> tuple[jax.Array, jax.Array]:
    """`(deps [b, t_out, t_in], mask [b, t_out])`: whether output frame t_out
    of row b depends on input frame t_in of row b, from the Jacobian of
    `layer`. Output channels are contracted with random weights so nothing
    cancels; complex values are split into real and imaginary parts."""

    def g(xv: jax.Array) -> tuple[jax.Array, jax.Array]:
        y = h.layer(variables, Sequence(xv, x.mask), constants)
        parts = [jnp.real(y.values), jnp.imag(y.values)]
        if not jnp.iscomplexobj(y.values):
            parts = [y.values]
        w = jax.random.normal(jax.random.PRNGKey(4321), parts[0].shape, parts[0].dtype)
        axes = tuple(range(2, y.values.ndim))
        return jnp.stack([jnp.sum(p * w, axis=axes) for p in parts]), y.mask

    j, mask = jax.jacrev(g, has_aux=True)(x.values)
    # j: [parts, b, t_out, b', t_in, *c]: nonzero anywhere, same row.
    nz = jnp.abs(j) > 0
    nz = jnp.any(nz.reshape((*nz.shape[:5], -1)), axis=(0, 5))
    rows = jnp.arange(nz.shape[0])
    return nz[rows, :, rows, :], mask


@dataclasses.dataclass(frozen=True)
class _RfProbe:
    """The input on which the receptive field is measured: `before` + core +
    `after` random valid frames."""

    x: Sequence
    constants: Constants | None


def _rf_probe(
    module: SequenceLayer,
    name: str,
    x: Sequence,
    constants: Constants | None,
    extend_constants: bool,
) -> _RfProbe | None:
    """None if there is nothing to measure; raises for integer dtypes."""
    declared = dict(module.receptive_field_per_step)
    union = union_receptive_fields(declared.values())
    if union is not None and math.isinf(union[0]) and math.isinf(union[1]):
        return None  # depends on everything: nothing to measure
    out_spec = module.get_output_spec(x.channel_spec, constants=constants)
    for what, dtype in (("input", x.dtype), ("output", out_spec.dtype)):
        if not _is_inexact(dtype):
            raise ValueError(
                f"verify_contract cannot measure the receptive field of {name} from "
                f"gradients: its {what} dtype is {jnp.dtype(dtype)}. Pass "
                "test_receptive_field=False."
            )
    ratio = Fraction(module.output_ratio)
    finite = [abs(e) for f in declared.values() if f is not None for e in f if math.isfinite(e)]
    extent = int(max(finite, default=0))
    # Extra frames before and after the core so outputs in the middle see
    # their whole declared window.
    before = 2 * extent if union is not None and union[0] < 0 else 0
    after = 2 * extent if union is not None and union[1] > 0 else 0
    period = math.ceil(Fraction(len(declared)) / ratio)
    core = max(x.shape[1], 2 * period, 2 * module.block_size, 8)
    total = before + core + after
    total += (-total) % math.lcm(module.block_size, (1 / ratio).numerator)
    rng = np.random.default_rng(1234)
    shape = (x.shape[0], total, *x.channel_shape)
    values = rng.normal(size=shape)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        values = values + 1j * rng.normal(size=shape)
    probe = MaskedSequence(values.astype(x.dtype), np.ones((x.shape[0], total), bool))
    if extend_constants and constants is not None:
        # Time-aligned Sequence constants get the same extra (valid) frames.
        def extend(s: Sequence) -> Sequence:
            if s.shape[1] != x.shape[1]:
                return s
            v = np.asarray(s.values)
            pre = rng.normal(size=(v.shape[0], before, *v.shape[2:])).astype(v.dtype)
            post = rng.normal(size=(v.shape[0], total - before - v.shape[1], *v.shape[2:]))
            v = np.concatenate([pre, v, post.astype(v.dtype)], axis=1)
            return MaskedSequence(v, np.ones(v.shape[:2], bool))

        constants = _map_sequence_constants(constants, extend)
    return _RfProbe(probe, constants)


def _check_receptive_field(
    module: SequenceLayer,
    name: str,
    deps: np.ndarray,
    mask: np.ndarray,
    relaxed: bool,
) -> None:
    declared = dict(module.receptive_field_per_step)
    ratio = Fraction(module.output_ratio)
    t_in = deps.shape[2]
    n = len(declared)
    problems: list[str] = []
    # Per step phase: the union of measured ranges (relative to
    # t_out // output_ratio) over the frames whose declared window fits in the
    # input, and whether each such frame reaches the input's edges.
    measured: dict[int, list[float]] = {}
    reach_start: dict[int, bool] = {}
    reach_end: dict[int, bool] = {}
    checked = 0
    for to in range(deps.shape[1]):
        phase = to % n
        field = declared[phase]
        base = math.floor(Fraction(to) / ratio)
        rows = np.flatnonzero(mask[:, to])
        if not rows.size:
            continue
        frame_deps = np.flatnonzero(deps[rows, to].any(axis=0))
        if field is None:
            checked += 1
            if frame_deps.size:
                problems.append(
                    f"step {phase} (output frame {to}) is declared to depend on no input, "
                    f"but depends on input frames {frame_deps.tolist()}"
                )
            continue
        start, end = field
        if (math.isfinite(start) and base + start < 0) or (
            math.isfinite(end) and base + end > t_in - 1
        ):
            continue  # the declared window is cut by an edge of the input
        checked += 1
        cur = measured.setdefault(phase, [math.inf, -math.inf])
        if not frame_deps.size:
            reach_start[phase] = reach_end[phase] = False
            continue
        cur[0] = min(cur[0], int(frame_deps.min()) - base)
        cur[1] = max(cur[1], int(frame_deps.max()) - base)
        reach_start[phase] = reach_start.get(phase, True) and frame_deps.min() == 0
        reach_end[phase] = reach_end.get(phase, True) and frame_deps.max() == t_in - 1
    for phase, (lo, hi) in sorted(measured.items()):
        start, end = declared[phase]  # type: ignore[misc]
        got: ReceptiveField = None if lo > hi else (lo, hi)
        if got is not None and math.isinf(start) and reach_start[phase]:
            got = (-math.inf, got[1])
        if got is not None and math.isinf(end) and reach_end[phase]:
            got = (got[0], math.inf)
        if relaxed:
            ok = got is None or (got[0] >= start and got[1] <= end)
        else:
            ok = got == (start, end)
        if not ok:
            problems.append(
                f"step {phase}: declared {(start, end)}, measured {got}"
                + (" (relaxed: the measured range must lie inside)" if relaxed else "")
            )
    if not checked:
        problems.append(
            f"no output frame could be checked: input of {t_in} valid frames gave the "
            f"output mask\n{_rows(mask)}"
        )
    if problems:
        _fail(
            name,
            "receptive field",
            "receptive_field_per_step does not match the dependencies measured from the "
            f"Jacobian of layer() on {t_in} valid frames (output_ratio={ratio}; ends at "
            "+-inf mean the dependency reaches the edge of the input):\n  "
            + "\n  ".join(problems)
            + "\nIf a parameter initializes to zero, bind with init_and_bind(..., "
            "randomize=True); if the layer stops gradients, pass test_receptive_field=False.",
        )
