"""`verify_contract`: the SequenceLayer contract checker (see the package docstring)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sequence_layers.sequence import ChannelSpec, MaskedSequence, Sequence
from sequence_layers.testing._compare import (
    _compare_sequences,
    _fail,
    _is_full_precision,
    _rows,
    get_grad_tols,
)
from sequence_layers.testing._harness import _Harness, _with_grads
from sequence_layers.testing._inputs import (
    _fill_invalid,
    _garbage_rows,
    _is_inexact,
    _map_sequence_constants,
    _np,
    _np_nan_pad,
    _np_pad_time,
    _np_pad_to_multiple,
    _np_sequence,
)
from sequence_layers.testing._receptive_field import (
    _check_receptive_field,
    _dependencies,
    _rf_probe,
)
from sequence_layers.types import Constants, SequenceLayer


def verify_contract(
    layer: SequenceLayer,
    x: Sequence,
    *,
    training: bool = False,
    constants: Constants | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    grad_rtol: float | None = None,
    grad_atol: float | None = None,
    test_gradients: bool = True,
    test_receptive_field: bool = True,
    test_padding_invariance: bool = True,
    test_batching: bool = True,
    relaxed_receptive_field: bool = False,
    jit: bool = True,
    stream_constants: bool = False,
    pad_constants: bool = False,
    test_2x_step: bool = True,
) -> Sequence:
    """Checks that a bound layer obeys the SequenceLayer contract on `x`.

    Args:
      layer: a bound module (`module.bind(variables)` or `init_and_bind`).
      x: the input `[b, t, *c]`; invalid frames are zeroed first.
      training: passed to every call.
      constants: passed to every call (copied, so layers cannot leak entries).
        Array leaves are taken to be batch-major (the batching check pads them).
      rtol, atol: tolerances on values.
      grad_rtol, grad_atol: tolerances on gradients; by default 1e-5 when the
        input and parameters are float32 and 1e-1 otherwise (never below
        rtol/atol).
      test_gradients, test_receptive_field, test_padding_invariance,
        test_batching, test_2x_step: switch single checks off.
      relaxed_receptive_field: only require the measured receptive field to
        lie inside the declared one.
      jit: compile all runs into one `jax.jit` program (stepping with
        `lax.scan`). Much faster; `jit=False` runs eagerly, for debugging.
      stream_constants: cut Sequence constants into blocks alongside x.
      pad_constants: pad Sequence constants alongside x in the padding check.

    Returns:
      `layer.layer(x).mask_invalid()`.

    Raises:
      AssertionError: naming the failed check, with the offending values.
      ValueError: on misuse (unbound layer, receptive field of integer inputs).
    """
    if layer.scope is None:
        raise ValueError(
            f"verify_contract needs a bound layer, got unbound {type(layer).__name__}. "
            "Use layer = module.bind(module.init(key, x)) or testing.init_and_bind."
        )
    name = f"{type(layer).__name__}({getattr(layer, 'config', '')})"
    module, variables = layer.unbind()
    rngs = {
        k: (r.as_jax_rng() if hasattr(r, "as_jax_rng") else r)
        for k, r in getattr(layer.scope, "rngs", {}).items()
    }
    x = _np_sequence(x)
    h = _Harness(
        module=module,
        variables=dict(variables),
        rngs=rngs,
        training=training,
        jit=jit,
        stream_constants=stream_constants,
        input_spec=ChannelSpec(x.channel_shape, x.dtype),
    )
    params = variables.get("params", {})
    if grad_rtol is None or grad_atol is None:
        # The least precise of the input and the parameters decides.
        dtypes = [x.dtype, *(v.dtype for v in jax.tree.leaves(params))]
        full = all(_is_full_precision(d) for d in dtypes)
        tols = get_grad_tols(jnp.float32 if full else jnp.bfloat16)
        grad_rtol = max(tols["grad_rtol"], rtol) if grad_rtol is None else grad_rtol
        grad_atol = max(tols["grad_atol"], atol) if grad_atol is None else grad_atol
    differentiate_x = _is_inexact(x.dtype)
    steppable = module.supports_step
    test_gradients = (
        test_gradients and steppable and (differentiate_x or bool(jax.tree.leaves(params)))
    )
    block = module.block_size
    in_lat, out_lat = module.input_latency, module.output_latency
    blocks = 2 if test_2x_step else 1
    pad_frames = 4 * block if test_padding_invariance else 0

    constants_nan = constants
    if test_padding_invariance and pad_constants:
        constants_nan = _map_sequence_constants(constants, lambda s: _np_nan_pad(s, pad_frames))

    def perturb(pad: bool, batch: bool, extra: int = 0) -> tuple[Sequence, Any]:
        """x with `extra` invalid frames, then NaN padding and/or garbage rows."""
        xp, cp = _np_pad_time(x, extra), constants
        if pad:
            xp, cp = _np_nan_pad(xp, pad_frames), constants_nan
        if batch:
            xp, cp = _garbage_rows((xp, cp))
        return xp, cp

    perturbed = test_padding_invariance or test_batching
    x_layer_p, c_layer_p = perturb(test_padding_invariance, test_batching)
    x_step = _np_pad_to_multiple(_np_pad_time(x, in_lat), block)
    x_step_p, c_step_p = perturb(test_padding_invariance, test_batching, extra=in_lat)
    x_step_p = _np_pad_to_multiple(x_step_p, block * blocks)
    probe = None
    if test_receptive_field:
        probe = _rf_probe(module, name, x, constants, stream_constants or pad_constants)

    # Output spec, from shapes only (before anything runs: a wrong spec makes
    # the check decorators raise inside the runs).
    y_shape = jax.eval_shape(lambda v, x: h.layer(v, x, constants), h.variables, x)
    spec = module.get_output_spec(x.channel_spec, constants=constants)
    if y_shape.channel_shape != tuple(spec.shape) or jnp.dtype(y_shape.dtype) != jnp.dtype(
        spec.dtype
    ):
        _fail(
            name,
            "output spec",
            f"layer() gives channel shape {y_shape.channel_shape} dtype "
            f"{jnp.dtype(y_shape.dtype)}, but get_output_spec({tuple(x.channel_shape)}, "
            f"{jnp.dtype(x.dtype)}) says {tuple(spec.shape)} {jnp.dtype(spec.dtype)}.",
        )
    if not math.prod(y_shape.shape):
        _fail(name, "output spec", f"layer() output is empty: shape {y_shape.shape}.")

    if steppable:
        # Checked before stepping: a scan would fail on a changing state.
        specs = h.state_specs(x_step, constants, block)
        for i, s in enumerate(specs[1:], 1):
            if s != specs[0]:
                _fail(
                    name,
                    "state",
                    f"the state after {i} step(s) differs from get_initial_state in pytree "
                    f"structure, shapes or dtypes (it must not depend on time):\n"
                    f"  initial: {specs[0][0]} {specs[0][1]}\n  after:   {s[0]} {s[1]}",
                )

    def run_layer(variables: Any, x: Sequence) -> tuple[Sequence, Any]:
        return h.layer(variables, x, constants), ()

    def run_steps(variables: Any, x: Sequence) -> tuple[Sequence, Any]:
        y, _ = h.steps(variables, x, constants, block)
        return y[:, out_lat:].mask_invalid(), y.mask

    def everything(variables: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """Every run the checks need, as one program (one compile)."""
        out: dict[str, Any] = {}
        if test_gradients:
            out["layer"] = _with_grads(run_layer, variables, inputs["x"], differentiate_x)
        else:
            out["layer"] = (h.layer(variables, inputs["x"], constants),)
        if perturbed:
            out["layer_p"] = h.layer(variables, inputs["x_layer_p"], c_layer_p)
        if probe is not None:
            out["rf"] = _dependencies(h, variables, inputs["probe"], probe.constants)
        if steppable:
            if test_gradients:
                out["step"] = _with_grads(run_steps, variables, inputs["x_step"], differentiate_x)
            else:
                out["step"] = run_steps(variables, inputs["x_step"])
            if perturbed or blocks == 2:
                y, _ = h.steps(variables, inputs["x_step_p"], c_step_p, block * blocks)
                out["step_p"] = y
        return out

    inputs = {"x": x, "x_layer_p": x_layer_p, "x_step": x_step, "x_step_p": x_step_p}
    if probe is not None:
        inputs["probe"] = probe.x
    results = jax.device_get(h.maybe_jit(everything)(h.variables, inputs))

    def check(problem: str | None, what: str, context: str = "") -> None:
        if problem is not None:
            _fail(name, what, (context + "\n" if context else "") + problem)

    def attribute(rerun: Callable[[bool, bool], str | None], mode: str, combined: str) -> None:
        """The combined padding + batching run failed: find which one."""
        if test_padding_invariance and test_batching:
            check(
                rerun(True, False),
                f"padding invariance, {mode}",
                f"appending {pad_frames} invalid frames and setting every invalid value to "
                "NaN changed the output on valid frames (NaN leaking from invalid frames?).",
            )
            check(
                rerun(False, True),
                f"batching, {mode}",
                "adding garbage rows (NaN values, all valid) above and below the batch "
                "changed the real rows (batch rows mixing?).",
            )
        what = "padding invariance" if test_padding_invariance else "batching"
        if test_padding_invariance and test_batching:
            what = "padding invariance + batching"
        _fail(name, f"{what}, {mode}", combined)

    y_layer = results["layer"][0]
    y_layer = MaskedSequence(_fill_invalid(y_layer.values, y_layer.mask, 0), y_layer.mask)
    # What the caller gets back: device arrays, like layer() gives.
    y_returned = MaskedSequence(jnp.asarray(y_layer.values), jnp.asarray(y_layer.mask))

    # Padding invariance and batching, layer-wise.
    def layer_rerun(pad: bool, batch: bool) -> str | None:
        xp, cp = perturb(pad, batch)
        y = h.maybe_jit(lambda v, x: h.layer(v, x, cp))(h.variables, xp)
        y = y[1:-1] if batch else y
        return _compare_sequences(
            y_layer, y, rtol=rtol, atol=atol, names=("layer(x)", "layer(x perturbed)")
        )

    if perturbed:
        y = results["layer_p"]
        y = y[1:-1] if test_batching else y
        problem = _compare_sequences(
            y_layer, y, rtol=rtol, atol=atol, names=("layer(x)", "layer(x perturbed)")
        )
        if problem is not None:
            attribute(layer_rerun, "layer-wise", problem)

    # Receptive field.
    if probe is not None:
        deps, rf_mask = results["rf"]
        _check_receptive_field(
            module, name, np.asarray(deps), np.asarray(rf_mask), relaxed_receptive_field
        )

    if not steppable:
        return y_returned

    # Leading latency outputs and layer/step equivalence.
    if test_gradients:
        y_step, full_mask, step_param_grads, step_x_grad = results["step"]
    else:
        y_step, full_mask = results["step"]
    leading = np.asarray(full_mask)[:, :out_lat]
    if leading.any():
        _fail(
            name,
            "leading latency",
            f"the first output_latency={out_lat} step outputs must be invalid (layer() never "
            f"produces them), but some are valid ('1'):\n{_rows(leading)}",
        )
    check(
        _compare_sequences(y_layer, y_step, rtol=rtol, atol=atol, names=("layer", "step")),
        "layer/step equivalence, 1x block_size",
        f"step over blocks of {block} of x padded with input_latency={in_lat} invalid frames, "
        f"first output_latency={out_lat} outputs dropped; extra trailing step outputs "
        "must be invalid.",
    )

    # 2x block size, padding invariance and batching, step-wise.
    def step_rerun(pad: bool, batch: bool, blocks: int = 1) -> str | None:
        xp, cp = perturb(pad, batch, extra=in_lat)
        xp = _np_pad_to_multiple(xp, block * blocks)
        fn = functools.partial(h.steps, constants=cp, block=block * blocks)
        y, _ = h.maybe_jit(fn)(h.variables, xp)
        y = y[1:-1] if batch else y
        return _compare_sequences(
            y_layer, y[:, out_lat:], rtol=rtol, atol=atol, names=("layer(x)", "step(x')")
        )

    if perturbed or blocks == 2:
        y = results["step_p"]
        y = (y[1:-1] if test_batching else y)[:, out_lat:]
        problem = _compare_sequences(
            y_layer, y, rtol=rtol, atol=atol, names=("layer(x)", "step(x')")
        )
        if problem is not None:
            if blocks == 2:
                check(
                    step_rerun(False, False, 2),
                    "layer/step equivalence, 2x block_size",
                    f"step over blocks of {2 * block} frames of x padded with "
                    f"input_latency={in_lat} invalid frames, first output_latency={out_lat} "
                    "outputs dropped.",
                )
            if not perturbed:
                _fail(name, "layer/step equivalence, 2x block_size", problem)
            attribute(functools.partial(step_rerun, blocks=1), "step-wise", problem)

    # Gradients.
    if test_gradients:
        _, _, layer_param_grads, layer_x_grad = results["layer"]
        if differentiate_x:
            check(
                _compare_sequences(
                    Sequence(layer_x_grad, x.mask),
                    Sequence(np.asarray(step_x_grad)[:, : x.shape[1]], x.mask),
                    rtol=grad_rtol,
                    atol=grad_atol,
                    names=("layer dx", "step dx"),
                ),
                "gradients, input",
                "d(sum of valid outputs)/dx differs between layer and step.",
            )
        flat_layer = jax.tree_util.tree_flatten_with_path(layer_param_grads)[0]
        flat_step = jax.tree.leaves(step_param_grads)
        for (path, gl), gs in zip(flat_layer, flat_step, strict=True):
            a, b = _np(gl), _np(gs)
            if not np.allclose(a, b, rtol=grad_rtol, atol=grad_atol, equal_nan=True):
                with np.errstate(invalid="ignore"):
                    max_diff = float(np.nanmax(np.abs(a - b)))
                _fail(
                    name,
                    "gradients, parameters",
                    f"d(sum of valid outputs)/d{jax.tree_util.keystr(path)} differs between "
                    f"layer and step (rtol={grad_rtol}, atol={grad_atol}, max |diff|="
                    f"{max_diff:.3g}):\n  layer: {np.array2string(a.reshape(-1)[:8], precision=5)}"
                    f"\n  step:  {np.array2string(b.reshape(-1)[:8], precision=5)}",
                )
    return y_returned
