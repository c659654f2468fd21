"""Recurrent layers: LSTM, GRU, a plain (Elman) RNN, and the RG-LRU.

All of them are causal with an unbounded past: receptive field `(-inf, 0)`.
`layer` and `step` both run the same cell over time in a `jax.lax.scan`
(rolled for whole sequences, unrolled for short step blocks; see
`_GatedRNN._run`), so the two agree frame for frame.

Invalid frames never touch the state: the state after an invalid frame is the
state before it, and the output there is masked. So a row can be fed any
number of invalid frames (leading latency outputs of an upstream layer, tail
padding, an idle stream) without changing what it computes on valid frames.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers import types
from sequence_layers.sequence import ChannelSpec, MaskedSequence, Sequence
from sequence_layers.simple._common import get_promoted_dtype

__all__ = ["GRU", "LSTM", "RGLRU", "RNN", "orthogonal_init", "unit_forget_bias"]

Initializer = Callable[..., jax.Array]
# A partitioning spec (one mesh axis name or None per parameter dimension).
Sharding = tuple[str | None, ...]
Params = dict[str, jax.Array]
# A recurrent state (leaves `[b, 1, units]`) or a split input projection.
Arrays = tuple[jax.Array, ...]


def unit_forget_bias(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """LSTM bias initializer: ones for the forget gate, zeros elsewhere
    (Jozefowicz et al. 2015). Gate order is (input, forget, cell, output)."""
    del key
    if len(shape) != 1 or shape[0] % 4 != 0:
        raise ValueError(f"unit_forget_bias needs a 1-D shape divisible by 4, got {shape}.")
    units = shape[0] // 4
    return jnp.concatenate(
        [jnp.zeros([units], dtype), jnp.ones([units], dtype), jnp.zeros([2 * units], dtype)]
    )


def orthogonal_init(scale: float = 1.0, column_axis: int = -1) -> Initializer:
    """Orthogonal initializer that also works for bfloat16 parameters (the QR
    decomposition only supports float32, so it runs there and is cast)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        value = nn.initializers.orthogonal(scale=scale, column_axis=column_axis)(
            key, shape, jnp.float32
        )
        return value.astype(dtype)

    return init


# Orthogonal, computed in float32 (shared default of the recurrent kernels).
default_recurrent_kernel_init = orthogonal_init()


def _shard(init: Initializer, sharding: Sharding | None) -> Initializer:
    return init if sharding is None else nn.with_partitioning(init, sharding)


def _as_sharding(value: Any) -> Sharding | None:
    return None if value is None else tuple(value)


class _Weight(nn.Module):
    """One parameter named `kernel`, so weights nest as `<name>/kernel` the
    way the reference's einsum-dense submodules do."""

    shape: tuple[int, ...]
    initializer: Initializer
    param_dtype: Any

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", self.initializer, self.shape, self.param_dtype)


# Scans over at most this many frames are unrolled (see `_GatedRNN._run`).
_FULL_UNROLL_FRAMES = 16


def _where_valid(valid: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """Per row, `new` where `valid [b]` else `old` (`[b, 1, units]`, in `old`'s dtype)."""
    return jnp.where(valid[:, None, None], new.astype(old.dtype), old)


def _check_units(units: int, name: str) -> None:
    if units <= 0:
        raise ValueError(f"{name}.Config needs units > 0, got {units=}.")


# Gated RNNs ---------------------------------------------------------------


def _post_init_gated(cfg: Any, name: str) -> None:
    """Config checks shared by LSTM, GRU and RNN (their fields differ only in
    activations, so each keeps its own Config)."""
    _check_units(cfg.units, name)
    for f in ("kernel_sharding", "recurrent_kernel_sharding", "bias_sharding"):
        object.__setattr__(cfg, f, _as_sharding(getattr(cfg, f)))


class _GatedRNN(types.SequenceLayer):
    """Shared machinery of LSTM, GRU and RNN: parameters, dtypes, the scan.

    Input `[b, t, d]`, output `[b, t, units]`. Subclasses define `_num_gates`,
    the bias parameters, the state layout and the pure cell function.
    """

    config: Any
    _num_gates = 1
    # Whether `_cell` gets the input projection split per gate (see `_project`).
    _split_gates = False

    @property
    def receptive_field_per_step(self) -> dict[int, types.ReceptiveField]:
        return {0: (-math.inf, 0)}

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        if len(input_shape) != 1:
            raise ValueError(
                f"{type(self).__name__} needs inputs [b, t, d] (one channel dim), got channel "
                f"shape {tuple(input_shape)}. Flatten the channels first (e.g. Flatten)."
            )
        return (self.config.units,)

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        return get_promoted_dtype(
            input_dtype, self.config.param_dtype, dtype=self.config.compute_dtype
        )

    @nn.nowrap
    def _bias_params(self) -> tuple[str, ...]:
        """Names of the `[num_gates * units]` bias parameters."""
        return ("bias",)

    @nn.compact
    def _params(self, input_dim: int) -> dict[str, jax.Array]:
        cfg = self.config
        width = self._num_gates * cfg.units
        params = {
            "kernel": _Weight(
                (input_dim, width),
                _shard(cfg.kernel_init, cfg.kernel_sharding),
                cfg.param_dtype,
                name="kernel",
            )(),
            "recurrent_kernel": _Weight(
                (cfg.units, width),
                _shard(cfg.recurrent_kernel_init, cfg.recurrent_kernel_sharding),
                cfg.param_dtype,
                name="recurrent_kernel",
            )(),
        }
        if cfg.use_bias:
            for name in self._bias_params():
                params[name] = self.param(
                    name, _shard(cfg.bias_init, cfg.bias_sharding), (width,), cfg.param_dtype
                )
        return params

    @nn.nowrap
    def _cell(self, params: Params, xw: Arrays, state: Arrays, valid: jax.Array) -> Arrays:
        """One frame: `xw` (input projection plus bias, `[b, 1, gates * units]`,
        split per gate if `_split_gates`), the state (`h` last) and `valid [b]`
        -> the new state (`state` on invalid rows). Selecting here, with the
        output read from the selected `h`, leaves each new state leaf the only
        user of its gates: one XLA:CPU fusion each (not one per gate)."""
        raise NotImplementedError

    @nn.nowrap
    def _project(self, params: dict[str, jax.Array], x: jax.Array) -> tuple[jax.Array, ...]:
        """Input projection plus bias of `x [..., d]`, as `_cell` takes it.

        Split per gate or not as measured per cell on XLA:CPU ([32, 256]
        frames): GRU, whose candidate needs its recurrent part apart, ran
        2.3x faster split (9.0 vs 21 ms); LSTM, which adds the whole
        recurrent projection and then splits, 2.4x faster whole.
        """
        xw = jnp.einsum("...d,dg->...g", x, params["kernel"], precision=self.config.precision)
        if self.config.use_bias:
            xw = xw + params["bias"]
        if self._split_gates:
            return tuple(jnp.split(xw, self._num_gates, axis=-1))
        return (xw,)

    @nn.nowrap
    def _recurrent(self, params: dict[str, jax.Array], h: jax.Array) -> jax.Array:
        return jnp.einsum(
            "...u,ug->...g", h, params["recurrent_kernel"], precision=self.config.precision
        )

    def _run(self, x: Sequence, state: Any) -> tuple[Sequence, Any]:
        """Scans the cell over `x [b, t, d]` from `state`."""
        dtype = self.get_output_dtype(x.dtype)
        # Zero invalid frames first: they may hold NaN, and NaN * 0 in a
        # backward pass would still poison the parameter gradients.
        x = x.mask_invalid()
        params = jax.tree.map(lambda p: p.astype(dtype), self._params(x.shape[-1]))
        # Time-major from here: projecting `[b, t, d]` and then swapping axes
        # made XLA:CPU emit the matmul with a transposed output layout, 4x
        # slower (11 vs 2.6 ms for [32, 256, 80] x [80, 384]).
        xs = jnp.swapaxes(x.values, 0, 1).astype(dtype)
        batch, frames = x.shape[:2]
        # Short (step) blocks are unrolled, which skips XLA's while-loop
        # bookkeeping per frame (LSTM x2, batch 1, 8-frame steps: +15%).
        unroll = frames <= _FULL_UNROLL_FRAMES
        # Input projection hoisted out of the cells for one row only: there
        # each frame's is a matrix-vector dot, a kernel of its own plus a
        # slicing fusion (hoisted, 256-frame `layer()`: RNN x2 1.3x, GRU and
        # LSTM x2 1.0-1.1x). More rows make it a small GEMM whose result stays
        # in cache; a hoisted GEMM runs on both threads of this 2-core machine
        # and was slower (LSTM x2, batch 32, 8-frame steps: 43.7 ms wall for
        # 61.8 ms CPU vs 37.6 / 39.5; `layer()`, batch 2/4/32: 1.0/1.0/0.7x).
        hoist = batch == 1
        if hoist:
            xs = self._project(params, xs)
        # The carry keeps the state's `[b, 1, units]` layout: reshaping to
        # `[b, units]` and back let XLA:CPU fuse the new state's select into
        # that reshape and duplicate it into the output, so the gates were
        # left in fusions of their own (with `_cell`: LSTM x2 / GRU x2, one
        # frame, 29 / 19 -> 18 / 14 ops; loop body per frame 15 / 11 -> 7 / 6).
        carry = tuple(state)

        def body(carry: Any, inputs: tuple[Any, jax.Array]) -> tuple[Any, jax.Array]:
            x_t, valid_t = inputs
            xw_t = x_t if hoist else self._project(params, x_t)
            xw_t = tuple(a[:, None] for a in xw_t)
            # Invalid frames keep the state and output zeros (no later pass).
            carry = self._cell(params, xw_t, carry, valid_t)
            h = carry[-1]
            return carry, jnp.where(valid_t[:, None, None], h, jnp.zeros_like(h))

        carry, ys = jax.lax.scan(body, carry, (xs, jnp.swapaxes(x.mask, 0, 1)), unroll=unroll)
        y = MaskedSequence(jnp.swapaxes(ys[:, :, 0], 0, 1), x.mask)
        return y, carry

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        state = self.get_initial_state(
            x.shape[0], x.channel_spec, training=training, constants=constants
        )
        y, _ = self._run(x, state)
        return y

    @types.check_step
    def step(
        self,
        x: Sequence,
        state: Any,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, Any]:
        return self._run(x, state)

    @nn.nowrap
    def _zeros(self, batch_size: int, input_spec: ChannelSpec) -> jax.Array:
        # A time axis of 1 broadcasts against one frame, as in the reference.
        dtype = self.get_output_dtype(input_spec.dtype)
        return jnp.zeros((batch_size, 1, self.config.units), dtype)


class LSTM(_GatedRNN):
    """Long short-term memory: `[b, t, d] -> [b, t, units]`.

    Gates in Keras order (input, forget, cell, output); parameters
    `kernel/kernel [d, 4u]`, `recurrent_kernel/kernel [u, 4u]`, `bias [4u]`.
    State `(c, h)`, each `[b, 1, units]` in the compute dtype.

    Example:
        >>> lstm = LSTM.Config(units=8).make()
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Output and state width.
        units: int
        # Dtype of the computation and output; None promotes input and params.
        compute_dtype: Any = None
        # Dtype of the parameters.
        param_dtype: Any = jnp.float32
        # Matmul precision (jax.lax.Precision or None).
        precision: Any = None
        # Applied to the cell candidate and the cell state.
        activation: Callable[[jax.Array], jax.Array] = jax.nn.tanh
        # Applied to the input, forget and output gates.
        recurrent_activation: Callable[[jax.Array], jax.Array] = jax.nn.sigmoid
        # Whether to add `bias`.
        use_bias: bool = True
        # Initializer of the input kernel `[d, 4u]`.
        kernel_init: Initializer = nn.linear.default_kernel_init
        # Partitioning of the input kernel.
        kernel_sharding: Sharding | None = None
        # Initializer of the recurrent kernel `[u, 4u]`.
        recurrent_kernel_init: Initializer = default_recurrent_kernel_init
        # Partitioning of the recurrent kernel.
        recurrent_kernel_sharding: Sharding | None = None
        # Initializer of the bias `[4u]`; forget gate at one by default.
        bias_init: Initializer = unit_forget_bias
        # Partitioning of the bias.
        bias_sharding: Sharding | None = None
        # Module name.
        name: str | None = None

        def __post_init__(self) -> None:
            _post_init_gated(self, "LSTM")

        def make(self) -> LSTM:
            return LSTM(self, name=self.name)

    config: Config
    _num_gates = 4

    @nn.nowrap
    def _cell(self, params: Params, xw: Arrays, state: Arrays, valid: jax.Array) -> Arrays:
        c_prev, h_prev = state
        zi, zf, zc, zo = jnp.split(xw[0] + self._recurrent(params, h_prev), 4, axis=-1)
        act, gate = self.config.activation, self.config.recurrent_activation
        c = _where_valid(valid, gate(zf) * c_prev + gate(zi) * act(zc), c_prev)
        # From the selected `c` (same on valid rows), its only user.
        return c, _where_valid(valid, gate(zo) * act(c), h_prev)

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """`(c, h)`, each zeros `[b, 1, units]`."""
        return self._zeros(batch_size, input_spec), self._zeros(batch_size, input_spec)


class _SingleStateRNN(_GatedRNN):
    """GRU and RNN: the state is just `h`."""

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[jax.Array]:
        """`(h,)`, zeros `[b, 1, units]`."""
        return (self._zeros(batch_size, input_spec),)


class GRU(_SingleStateRNN):
    """Gated recurrent unit (the "reset after" form of Keras, PyTorch and
    flax): `[b, t, d] -> [b, t, units]`.

        z = sigmoid(x Wz + bz + h Uz + b'z)           update gate
        r = sigmoid(x Wr + br + h Ur + b'r)           reset gate
        n = tanh(x Wn + bn + r * (h Un + b'n))  candidate
        h = z * h_prev + (1 - z) * n

    Parameters `kernel/kernel [d, 3u]`, `recurrent_kernel/kernel [u, 3u]`,
    `bias [3u]` and `recurrent_bias [3u]`, gates in order (z, r, n); a Keras
    `GRU(reset_after=True)` bias `[2, 3u]` is `(bias, recurrent_bias)`.
    State `h [b, 1, units]` in the compute dtype.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Output and state width.
        units: int
        # Dtype of the computation and output; None promotes input and params.
        compute_dtype: Any = None
        # Dtype of the parameters.
        param_dtype: Any = jnp.float32
        # Matmul precision (jax.lax.Precision or None).
        precision: Any = None
        # Applied to the candidate state.
        activation: Callable[[jax.Array], jax.Array] = jax.nn.tanh
        # Applied to the update and reset gates.
        recurrent_activation: Callable[[jax.Array], jax.Array] = jax.nn.sigmoid
        # Whether to add `bias` and `recurrent_bias`.
        use_bias: bool = True
        # Initializer of the input kernel `[d, 3u]`.
        kernel_init: Initializer = nn.linear.default_kernel_init
        # Partitioning of the input kernel.
        kernel_sharding: Sharding | None = None
        # Initializer of the recurrent kernel `[u, 3u]`.
        recurrent_kernel_init: Initializer = default_recurrent_kernel_init
        # Partitioning of the recurrent kernel.
        recurrent_kernel_sharding: Sharding | None = None
        # Initializer of both biases `[3u]`.
        bias_init: Initializer = nn.initializers.zeros
        # Partitioning of the biases.
        bias_sharding: Sharding | None = None
        # Module name.
        name: str | None = None

        def __post_init__(self) -> None:
            _post_init_gated(self, "GRU")

        def make(self) -> GRU:
            return GRU(self, name=self.name)

    config: Config
    _num_gates = 3
    _split_gates = True

    @nn.nowrap
    def _bias_params(self) -> tuple[str, ...]:
        return ("bias", "recurrent_bias")

    @nn.nowrap
    def _cell(self, params: Params, xw: Arrays, state: Arrays, valid: jax.Array) -> Arrays:
        (h_prev,) = state
        hu = self._recurrent(params, h_prev)
        if self.config.use_bias:
            hu = hu + params["recurrent_bias"]
        xz, xr, xn = xw
        hz, hr, hn = jnp.split(hu, 3, axis=-1)
        gate = self.config.recurrent_activation
        z = gate(xz + hz)
        r = gate(xr + hr)
        n = self.config.activation(xn + r * hn)
        return (_where_valid(valid, z * h_prev + (1 - z) * n, h_prev),)


class RNN(_SingleStateRNN):
    """A plain (Elman) recurrent layer: `h = activation(x W + b + h_prev U)`,
    `[b, t, d] -> [b, t, units]`.

    Parameters `kernel/kernel [d, u]`, `recurrent_kernel/kernel [u, u]`,
    `bias [u]`. State `h [b, 1, units]` in the compute dtype.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Output and state width.
        units: int
        # Dtype of the computation and output; None promotes input and params.
        compute_dtype: Any = None
        # Dtype of the parameters.
        param_dtype: Any = jnp.float32
        # Matmul precision (jax.lax.Precision or None).
        precision: Any = None
        # Applied to the pre-activation to give the new state.
        activation: Callable[[jax.Array], jax.Array] = jax.nn.tanh
        # Whether to add `bias`.
        use_bias: bool = True
        # Initializer of the input kernel `[d, u]`.
        kernel_init: Initializer = nn.linear.default_kernel_init
        # Partitioning of the input kernel.
        kernel_sharding: Sharding | None = None
        # Initializer of the recurrent kernel `[u, u]`.
        recurrent_kernel_init: Initializer = default_recurrent_kernel_init
        # Partitioning of the recurrent kernel.
        recurrent_kernel_sharding: Sharding | None = None
        # Initializer of the bias `[u]`.
        bias_init: Initializer = nn.initializers.zeros
        # Partitioning of the bias.
        bias_sharding: Sharding | None = None
        # Module name.
        name: str | None = None

        def __post_init__(self) -> None:
            _post_init_gated(self, "RNN")

        def make(self) -> RNN:
            return RNN(self, name=self.name)

    config: Config
    _num_gates = 1

    @nn.nowrap
    def _cell(self, params: Params, xw: Arrays, state: Arrays, valid: jax.Array) -> Arrays:
        (h_prev,) = state
        h = self.config.activation(xw[0] + self._recurrent(params, h_prev))
        return (_where_valid(valid, h, h_prev),)


# RG-LRU -------------------------------------------------------------------


def _rnn_real_param_init(min_rad: float, max_rad: float, eps: float = 1e-8) -> Initializer:
    """`a_param` such that `exp(-softplus(a_param))` is uniform (by area) on
    the ring `[min_rad, max_rad]`."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        unif = jax.random.uniform(key, shape=shape)
        a_real = 0.5 * jnp.log(unif * (max_rad**2 - min_rad**2) + min_rad**2 + eps)
        # Inverse of softplus, applied to -a_real.
        return jnp.log(jnp.exp(-a_real) - 1.0).astype(dtype)

    return init


def _rnn_imag_param_init(max_rad: float) -> Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return (jnp.pi * max_rad * jax.random.uniform(key, shape=shape)).astype(dtype)

    return init


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sqrt_bound_derivative(x: jax.Array, max_gradient: float) -> jax.Array:
    """`sqrt(x)` whose derivative is clipped at `max_gradient` (so training
    in bfloat16 does not blow up near x = 0)."""
    return jnp.sqrt(x)


def _sqrt_fwd(x: jax.Array, max_gradient: float) -> tuple[jax.Array, jax.Array]:
    return jnp.sqrt(x), x


def _sqrt_bwd(max_gradient: float, x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    x_pre = jnp.maximum(x, 1 / (4 * max_gradient**2))
    return jax.vjp(jnp.sqrt, x_pre)[1](g)


_sqrt_bound_derivative.defvjp(_sqrt_fwd, _sqrt_bwd)


def _linear_scan(a: jax.Array, x: jax.Array, h0: jax.Array, associative: bool) -> jax.Array:
    """`h_t = a_t * h_{t-1} + x_t` over axis 1 of `a, x [b, t, u]` from
    `h0 [b, u]`; returns every `h_t`, `[b, t, u]`."""
    if associative:

        def combine(
            left: tuple[jax.Array, jax.Array], right: tuple[jax.Array, jax.Array]
        ) -> tuple[jax.Array, jax.Array]:
            return left[0] * right[0], right[0] * left[1] + right[1]

        a_cum, x_cum = jax.lax.associative_scan(combine, (a, x), axis=1)
        return a_cum * h0[:, None, :] + x_cum

    def body(h: jax.Array, inputs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        h = inputs[0] * h + inputs[1]
        return h, h

    _, hs = jax.lax.scan(body, h0, (jnp.swapaxes(a, 0, 1), jnp.swapaxes(x, 0, 1)))
    return jnp.swapaxes(hs, 0, 1)


class RGLRU(types.SequenceLayer):
    """Real-Gated Linear Recurrent Unit from Griffin
    (https://arxiv.org/abs/2402.19427), as in google-deepmind/recurrentgemma:
    `[b, t, units] -> [b, t, units]`.

        gate_x, gate_a = sigmoid(block-diagonal projections of x, per head)
        a = exp(-8 * gate_a * softplus(a_param))      (times e^{iθ} if complex)
        h_t = a_t * h_{t-1} + sqrt(1 - |a_t|^2) * (gate_x * x_t)

    The first valid frame of a stream resets: `h = gate_x * x` there.

    State `(h [b, units] float32, start_index [b] int32)`. Unlike the
    reference, `start_index` counts *valid* frames and invalid frames carry
    `h` through unchanged (the reference's scan ignores the mask and counts
    physical frames). That keeps step == layer when the RG-LRU follows a
    layer with latency (whose leading step outputs are invalid) and makes
    invalid frames (padding, idle streams) unable to change anything.

    The recurrence always runs in float32 (complex64 when `only_real=False`);
    every `scan_type` gives the same result: `linear_pallas` falls back to
    the native linear scan.
    """

    ScanType = Literal["auto", "linear_native", "associative_native", "linear_pallas"]

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Width of input, output and state.
        units: int
        # Heads of the block-diagonal gate projections; divides the (complex) units.
        num_heads: int
        # How the recurrence is scanned: 'auto'/'linear_native' (sequential),
        # 'associative_native' (parallel prefix), 'linear_pallas' (= linear).
        scan_type: str = "auto"
        # Partitioning of the scan (accepted for compatibility; unused).
        scan_sharding: Sharding | None = None
        # Real recurrence if True; else units/2 complex units (real, imag halves).
        only_real: bool = True
        # Smallest initial |a| (the largest is 0.999).
        min_rad: float = 0.9
        # Partitioning of `a_param` / `a_imag_param`.
        a_sharding: Sharding | None = None
        # Variance scale of the gate kernels' fan-in normal initializer.
        gate_kernel_variance_scale: float = 1.0
        # Partitioning of the gate kernels `[heads, units/heads, complex_units/heads]`.
        gate_kernel_sharding: Sharding | None = None
        # Partitioning of the gate biases `[heads, complex_units/heads]`.
        gate_bias_sharding: Sharding | None = None
        # Dtype of the gates and output; None promotes input and params.
        compute_dtype: Any = None
        # Dtype of the parameters.
        param_dtype: Any = jnp.float32
        # Module name.
        name: str | None = None

        def __post_init__(self) -> None:
            _check_units(self.units, "RGLRU")
            scan_types = ("auto", "linear_native", "associative_native", "linear_pallas")
            if self.scan_type not in scan_types:
                raise ValueError(f"Unknown {self.scan_type=}; expected one of {scan_types}.")
            if not self.only_real:
                if self.units % 2 != 0:
                    raise ValueError(f"only_real=False needs an even units, got {self.units=}.")
                if self.min_rad >= 0.999:
                    raise ValueError(f"only_real=False needs min_rad < 0.999, got {self.min_rad=}.")
            complex_units = self.units if self.only_real else self.units // 2
            if self.num_heads <= 0 or complex_units % self.num_heads != 0:
                raise ValueError(
                    f"num_heads must divide the number of complex units, got {self.num_heads=} "
                    f"and {complex_units=} (units={self.units}, only_real={self.only_real})."
                )
            for f in ("scan_sharding", "a_sharding", "gate_kernel_sharding", "gate_bias_sharding"):
                object.__setattr__(self, f, _as_sharding(getattr(self, f)))

        def make(self) -> RGLRU:
            return RGLRU(self, name=self.name)

    config: Config

    @property
    def receptive_field_per_step(self) -> dict[int, types.ReceptiveField]:
        return {0: (-math.inf, 0)}

    @property
    def _complex_units(self) -> int:
        return self.config.units if self.config.only_real else self.config.units // 2

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        if tuple(input_shape) != (self.config.units,):
            raise ValueError(
                f"RGLRU needs inputs [b, t, units={self.config.units}], got channel shape "
                f"{tuple(input_shape)}. Project to {self.config.units} channels first."
            )
        return (self.config.units,)

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        return get_promoted_dtype(
            input_dtype, self.config.param_dtype, dtype=self.config.compute_dtype
        )

    @nn.compact
    def _params(self) -> dict[str, jax.Array]:
        cfg = self.config
        cu, heads = self._complex_units, cfg.num_heads
        params = {
            "a_param": self.param(
                "a_param",
                _shard(_rnn_real_param_init(cfg.min_rad, 0.999), cfg.a_sharding),
                (cu,),
                cfg.param_dtype,
            )
        }
        if not cfg.only_real:
            params["a_imag_param"] = self.param(
                "a_imag_param",
                _shard(_rnn_imag_param_init(0.1), cfg.a_sharding),
                (cu,),
                cfg.param_dtype,
            )
        kernel_init = nn.initializers.variance_scaling(
            cfg.gate_kernel_variance_scale, "fan_in", "normal"
        )
        for gate in ("input_gate", "a_gate"):
            params[gate] = _GateWeights(
                (heads, cfg.units // heads, cu // heads),
                _shard(kernel_init, cfg.gate_kernel_sharding),
                _shard(nn.initializers.zeros, cfg.gate_bias_sharding),
                cfg.param_dtype,
                name=gate,
            )()
        return params

    def _run(
        self, x: Sequence, h: jax.Array, start_index: jax.Array
    ) -> tuple[Sequence, jax.Array, jax.Array]:
        cfg = self.config
        dtype = self.get_output_dtype(x.dtype)
        cu, heads = self._complex_units, cfg.num_heads
        mask = x.mask
        # Zero invalid frames first: NaN there would poison gradients.
        values = x.mask_invalid().values.astype(dtype)
        params = jax.tree.map(lambda p: p.astype(dtype), self._params())
        b, t = values.shape[:2]
        x_heads = values.reshape(b, t, heads, cfg.units // heads)

        def gate(name: str) -> jax.Array:
            w, bias = params[name]
            return jax.nn.sigmoid(jnp.einsum("bthi,hij->bthj", x_heads, w) + bias).reshape(b, t, cu)

        gate_x, gate_a = gate("input_gate"), gate("a_gate")
        log_a_real = -8.0 * gate_a * jax.nn.softplus(params["a_param"])
        multiplier = _sqrt_bound_derivative(1 - jnp.exp(2 * log_a_real), 1000.0)

        # Position of each frame among the row's valid frames; the first
        # valid frame of the stream resets the recurrence.
        counts = mask.astype(jnp.int32)
        position = start_index[:, None] + jnp.cumsum(counts, axis=1) - counts
        reset = (mask & (position == 0))[..., None]
        valid = mask[..., None]
        multiplier = jnp.where(reset, jnp.ones_like(multiplier), multiplier)

        # The recurrence runs in float32 (complex64), as the state does.
        a = jnp.exp(log_a_real.astype(jnp.float32))
        if cfg.only_real:
            x_in = values.astype(jnp.float32)
            h0 = h
        else:
            theta = (params["a_imag_param"] * gate_a).astype(jnp.float32)
            a = a * jax.lax.complex(jnp.cos(theta), jnp.sin(theta))
            v32 = values.astype(jnp.float32)
            x_in = jax.lax.complex(v32[..., :cu], v32[..., cu:])
            h0 = jax.lax.complex(h[..., :cu], h[..., cu:])
        x_in = x_in * (gate_x * multiplier).astype(jnp.float32)
        # Reset frames start from zero; invalid frames keep h as it was.
        a = jnp.where(reset, jnp.zeros_like(a), a)
        a = jnp.where(valid, a, jnp.ones_like(a))
        x_in = jnp.where(valid, x_in, jnp.zeros_like(x_in))

        hs = _linear_scan(a, x_in, h0, associative=cfg.scan_type == "associative_native")
        if not cfg.only_real:
            hs = jnp.concatenate([jnp.real(hs), jnp.imag(hs)], axis=-1)
        y = Sequence(hs.astype(dtype), mask).mask_invalid()
        return y, hs[:, -1], start_index + jnp.sum(mask, axis=1, dtype=jnp.int32)

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        h, start_index = self.get_initial_state(
            x.shape[0], x.channel_spec, training=training, constants=constants
        )
        y, _, _ = self._run(x, h, start_index)
        return y

    @types.check_step
    def step(
        self,
        x: Sequence,
        state: tuple[jax.Array, jax.Array],
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, tuple[jax.Array, jax.Array]]:
        h, start_index = state
        y, h, start_index = self._run(x, h, start_index)
        return y, (h, start_index)

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """`(h [b, units] float32 zeros, start_index [b] int32 zeros)`."""
        h = jnp.zeros((batch_size, self.config.units), jnp.float32)
        return h, jnp.zeros((batch_size,), jnp.int32)


class _GateWeights(nn.Module):
    """A block-diagonal (per head) projection's `kernel` and `bias`."""

    shape: tuple[int, int, int]
    kernel_init: Initializer
    bias_init: Initializer
    param_dtype: Any

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", self.kernel_init, self.shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.shape[0], self.shape[2]), self.param_dtype)
        return kernel, bias
