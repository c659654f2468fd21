"""Public test helpers: random inputs and the SequenceLayer contract checker.

`verify_contract(layer, x)` is how every layer in this library is tested, and
how users test their own layers:

    >>> m = MyLayer.Config(...).make()
    >>> layer = init_and_bind(m, x)          # or m.bind(m.init(key, x))
    >>> y = verify_contract(layer, x)        # raises AssertionError on a violation

It checks, in this order (each failure raises AssertionError naming its check
and showing the values):

1. output spec: `layer(x)` has `get_output_spec(x.channel_spec)`, and is not empty;
2. state: `step` keeps the state's pytree structure (node classes included),
   shapes and dtypes (both traced before anything runs);
3. padding invariance: appending `4 * block_size` invalid frames and filling
   every invalid value with NaN changes nothing, layer-wise and step-wise;
4. batching: garbage rows (NaN, all valid) above and below the batch change
   nothing in the real rows, layer-wise and step-wise;
5. receptive field: the declared `receptive_field_per_step` equals the one
   measured from the Jacobian of `layer` (`relaxed_receptive_field`: contains it);
6. leading latency: the first `output_latency` step outputs are invalid;
7. layer/step equivalence at 1x and 2x `block_size`: `layer(x)` equals `step`
   over `x.pad_time(0, input_latency)` minus the first `output_latency`
   outputs (values on valid frames, masks exactly; extra trailing step
   outputs must be invalid);
8. gradients: input and parameter gradients (of the sum of valid outputs)
   agree between layer and step.

All runs are compiled into one program (`jit=True`, the default), since XLA
compilation dominates the cost of small tests; padding invariance, batching
and the 2x block size share one step run, re-run separately only to say which
check failed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from sequence_layers.sequence import MASK_DTYPE, ChannelSpec, MaskedSequence, Sequence
from sequence_layers.types import (
    Constants,
    ReceptiveField,
    SequenceLayer,
    SequenceLayerConfig,
    union_receptive_fields,
)

__all__ = [
    "assert_sequences_close",
    "get_grad_tols",
    "init_and_bind",
    "random_sequence",
    "standard_dtype_configs",
    "verify_contract",
]


# Inputs ----------------------------------------------------------------------


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


def init_and_bind(
    config_or_module: SequenceLayerConfig | SequenceLayer,
    x: Sequence,
    *,
    constants: Constants | None = None,
    seed: int = 0,
    randomize: bool = False,
    training: bool = False,
) -> Any:
    """Initializes a layer via `layer(x)` and returns the bound module.

    `randomize=True` replaces every floating-point parameter with standard
    normal values, for layers whose initializers give zeros (a zero kernel
    hides dependencies from the receptive-field check). The bound module gets
    a `dropout` RNG so layers that need one in training mode run.
    """
    module = (
        config_or_module.make()
        if isinstance(config_or_module, SequenceLayerConfig)
        else config_or_module
    )
    init_key, dropout_key, random_key = np.random.default_rng(seed).integers(0, 2**31 - 1, size=3)

    def init(x: Sequence) -> Any:
        variables = dict(
            module.init(
                {
                    "params": jax.random.PRNGKey(init_key),
                    "dropout": jax.random.PRNGKey(dropout_key),
                },
                x,
                training=training,
                constants=constants,
                method="layer",
            )
        )
        if randomize and "params" in variables:
            leaves, treedef = jax.tree.flatten(variables["params"])
            keys = jax.random.split(jax.random.PRNGKey(random_key), max(len(leaves), 1))
            leaves = [
                jax.random.normal(k, leaf.shape, leaf.dtype) if _is_inexact(leaf.dtype) else leaf
                for k, leaf in zip(keys, leaves, strict=False)
            ]
            variables["params"] = jax.tree.unflatten(treedef, leaves)
        return variables

    # Compiled as one program: eager initializers compile op by op (slow).
    variables = _run_compiled(init, x)
    return module.bind(variables, rngs={"dropout": jax.random.PRNGKey(dropout_key)})


# Numpy helpers -----------------------------------------------------------------
# Inputs are prepared and outputs compared in numpy: every eager jnp op on a
# new shape costs an XLA compile, which dominates small tests.


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


# Running the layer -----------------------------------------------------------


def _fail(layer_name: str, check: str, detail: str) -> NoReturn:
    raise AssertionError(f"verify_contract [{check}] failed for {layer_name}:\n{detail}")


def _tree_spec(tree: Any) -> tuple[str, list[tuple[tuple[int, ...], Any]]]:
    # str(treedef), since treedef equality ignores the node class
    # (Sequence vs MaskedSequence).
    leaves, treedef = jax.tree.flatten(tree)
    return str(treedef), [(tuple(np.shape(v)), jnp.dtype(v.dtype)) for v in leaves]


# The test programs run once: cheap compilation beats fast code. On CPU these
# cut compile time about 3x (measured on a small conv: 0.8 s -> 0.27 s per
# verify_contract); numerics are unaffected. Backends ignore options they lack.
_FAST_COMPILE_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
    # jaxlib 0.10's YNNPACK fusions miscompile batched float32 LayerNorm VJPs
    # on CPU (wrong Jacobians, so receptive fields that look too wide).
    "xla_cpu_experimental_ynn_fusion_type": "",
}


def _run_compiled(fn: Callable[..., Any], *args: Any) -> Any:
    lowered = jax.jit(fn).lower(*args)
    try:
        compiled = lowered.compile(compiler_options=_FAST_COMPILE_OPTIONS)
    except Exception:  # a backend without these options
        compiled = lowered.compile()
    return compiled(*args)


def _copy(constants: Constants | None) -> Constants | None:
    # Layers may add entries to constants; never let that leak between runs.
    return None if constants is None else dict(constants)


@dataclasses.dataclass
class _Harness:
    """Runs an unbound copy of the layer functionally on explicit variables.

    With `jit`, `steps` scans over blocks (`lax.scan`) and `maybe_jit` wraps
    functions in `jax.jit`; without, everything runs eagerly in Python loops
    (slower, but breakpoints and prints in layer code work).
    """

    module: SequenceLayer
    variables: dict[str, Any]
    rngs: dict[str, jax.Array]
    training: bool
    jit: bool
    stream_constants: bool
    input_spec: ChannelSpec

    @property
    def mutable(self) -> list[str] | bool:
        # Layers may update non-parameter collections (e.g. batch statistics)
        # when training; the updates are dropped.
        others = [c for c in self.variables if c != "params"]
        return others or False

    def apply(self, variables: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        out = self.module.apply(
            variables, *args, method=method, rngs=self.rngs, mutable=self.mutable, **kwargs
        )
        return out[0] if self.mutable else out

    def maybe_jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return functools.partial(_run_compiled, fn) if self.jit else fn

    def layer(self, variables: Any, x: Sequence, constants: Constants | None) -> Sequence:
        y = self.apply(variables, "layer", x, training=self.training, constants=_copy(constants))
        return y.mask_invalid()

    def initial_state(self, variables: Any, batch: int, constants: Constants | None) -> Any:
        return self.apply(
            variables,
            "get_initial_state",
            batch,
            self.input_spec,
            training=self.training,
            constants=_copy(constants),
        )

    def step(
        self, variables: Any, x: Sequence, state: Any, constants: Constants | None
    ) -> tuple[Sequence, Any]:
        return self.apply(
            variables, "step", x, state, training=self.training, constants=_copy(constants)
        )

    def split_constants(
        self, constants: Constants | None, time: int
    ) -> tuple[Constants | None, dict[str, Sequence]]:
        """(fixed, streamed): with `stream_constants`, Sequence constants are
        cut into blocks alongside x (padded with invalid frames to x's length)."""
        if constants is None or not self.stream_constants:
            return constants, {}
        fixed, streamed = {}, {}
        for k, v in constants.items():
            if isinstance(v, Sequence):
                if v.shape[1] > time:
                    raise ValueError(
                        f"Streamed constant {k!r} has {v.shape[1]} frames, more than the "
                        f"stepped input's {time}; streamed constants must be time-aligned with x."
                    )
                streamed[k] = v.pad_time(0, time - v.shape[1], valid=False)
            else:
                fixed[k] = v
        return fixed, streamed

    def block_constants(
        self, fixed: Constants | None, streamed: dict[str, Sequence], sl: slice
    ) -> Constants | None:
        if not streamed:
            return fixed
        return {**(fixed or {}), **{k: v[:, sl] for k, v in streamed.items()}}

    def steps(
        self, variables: Any, x: Sequence, constants: Constants | None, block: int
    ) -> tuple[Sequence, Any]:
        """Steps over `x` (a multiple of `block` frames): `(y, final_state)`."""
        fixed, streamed = self.split_constants(constants, x.shape[1])
        state = self.initial_state(variables, x.shape[0], constants)
        n = x.shape[1] // block
        if n == 0:
            spec = self.module.get_output_spec(x.channel_spec, constants=constants)
            values = jnp.zeros((x.shape[0], 0, *spec.shape), spec.dtype)
            return Sequence(values, jnp.zeros((x.shape[0], 0), MASK_DTYPE)), state
        if not self.jit:
            outputs = []
            for i in range(n):
                sl = slice(i * block, (i + 1) * block)
                c = self.block_constants(fixed, streamed, sl)
                y, state = self.step(variables, x[:, sl], state, c)
                outputs.append(Sequence(y.values, y.mask))
            return Sequence.concatenate_sequences(outputs), state

        # Stacked blocks are [n, b, block, ...]; kept as (values, mask) since
        # a Sequence wants [b, t] leading axes.
        def cut(a: jax.Array) -> jax.Array:
            return jnp.moveaxis(a.reshape((*a.shape[:1], n, block, *a.shape[2:])), 1, 0)

        def join(a: jax.Array) -> jax.Array:
            a = jnp.moveaxis(a, 0, 1)
            return a.reshape((*a.shape[:1], -1, *a.shape[3:]))

        def body(state: Any, inputs: Any) -> tuple[Any, Any]:
            (xv, xm), cb = inputs
            c = fixed
            if cb:
                c = {**(fixed or {}), **{k: Sequence(*v) for k, v in cb.items()}}
            y, state = self.step(variables, type(x)(xv, xm), state, c)
            return state, (y.values, y.mask)

        cuts = {k: (cut(v.values), cut(v.mask)) for k, v in streamed.items()}
        state, (yv, ym) = jax.lax.scan(body, state, ((cut(x.values), cut(x.mask)), cuts))
        return Sequence(join(yv), join(ym)), state

    def state_specs(self, x: Sequence, constants: Constants | None, block: int) -> list[Any]:
        """Specs of the state after 0, 1 and 2 steps (traced, nothing runs)."""

        def two_steps(variables: Any, x: Sequence) -> list[Any]:
            fixed, streamed = self.split_constants(constants, x.shape[1])
            state = self.initial_state(variables, x.shape[0], constants)
            states = [state]
            for i in range(2):
                sl = slice(i * block, (i + 1) * block)
                c = self.block_constants(fixed, streamed, sl)
                _, state = self.step(variables, x[:, sl], state, c)
                states.append(state)
            return states

        x = _np_pad_time(x, 2 * block - x.shape[1])
        return [_tree_spec(s) for s in jax.eval_shape(two_steps, self.variables, x)]


def _with_grads(
    run: Callable[[Any, Sequence], tuple[Sequence, Any]],
    variables: dict[str, Any],
    x: Sequence,
    differentiate_x: bool,
) -> tuple[Sequence, Any, Any, Any]:
    """Runs `run(variables, x) -> (y, aux)` and pulls back ones on y's valid
    frames. Returns `(y, aux, param_grads, x_grad)`."""
    params = variables.get("params", {})
    rest = {k: v for k, v in variables.items() if k != "params"}

    def f(params: Any, xv: jax.Array) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        y, aux = run({**rest, "params": params}, type(x)(xv, x.mask))
        return y.values, (y.mask, aux)

    if differentiate_x:
        yv, pullback, (ymask, aux) = jax.vjp(f, params, x.values, has_aux=True)
    else:
        yv, pullback, (ymask, aux) = jax.vjp(lambda p: f(p, x.values), params, has_aux=True)
    dy = jnp.where(_expand_j(ymask, yv), jnp.ones_like(yv), jnp.zeros_like(yv))
    grads = pullback(dy)
    return Sequence(yv, ymask), aux, grads[0], grads[1] if differentiate_x else None


def _expand_j(mask: jax.Array, values: jax.Array) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * (values.ndim - 2))


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


# Receptive field ---------------------------------------------------------------


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


# The contract checker --------------------------------------------------------


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
