"""The compiled harness that runs an unbound layer on explicit variables."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sequence_layers.sequence import MASK_DTYPE, ChannelSpec, Sequence
from sequence_layers.testing._inputs import _is_inexact, _np_pad_time
from sequence_layers.types import Constants, SequenceLayer, SequenceLayerConfig


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
