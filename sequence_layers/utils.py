"""Shared rules: padding modes, conv masks, and how layer properties compose.

Everything here is pure (no Flax state); layers and combinators call it so a
rule lives in exactly one place.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from collections.abc import Sequence as PySequence
from fractions import Fraction
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from sequence_layers.sequence import MASK_DTYPE, Sequence
from sequence_layers.types import (
    Constants,
    PaddingMode,
    ReceptiveField,
    SequenceLayer,
    SequenceLayerConfig,
    detached,
    union_receptive_fields,
    validate_padding,
)

# Padding rules (REFERENCE section 2) --------------------------------------

_AND_MODES = ("valid", "causal_valid", "reverse_causal_valid")
STEPPABLE_CONV_PADDINGS = (
    "causal_valid",
    "reverse_causal_valid",
    "causal",
    "reverse_causal",
    "semicausal",
)


def effective_kernel_size(kernel_size: int, dilation_rate: int = 1) -> int:
    return (kernel_size - 1) * dilation_rate + 1


def convolution_explicit_padding(
    padding: str, kernel_size: int, stride: int = 1, dilation_rate: int = 1
) -> tuple[int, int]:
    """(left, right) time padding `layer` applies for a padding mode."""
    padding = validate_padding(padding)
    k = effective_kernel_size(kernel_size, dilation_rate)
    match padding:
        case "valid":
            return 0, 0
        case "same":
            return (k - 1) // 2, (k - 1) - (k - 1) // 2
        case "causal_valid" | "causal":
            return k - 1, 0
        case "reverse_causal_valid" | "reverse_causal":
            return 0, k - 1
        case "semicausal":
            left = max(k - stride, 0)
            return left, max(k - 1 - left, 0)
        case "semicausal_full":
            return max(k - stride, 0), k - 1
    raise AssertionError(padding)


def conv_input_latency(padding: str, kernel_size: int, dilation_rate: int = 1) -> int:
    k = effective_kernel_size(kernel_size, dilation_rate)
    if padding in ("reverse_causal_valid", "reverse_causal", "semicausal_full"):
        return k - 1
    return 0


def conv_output_latency(
    padding: str, kernel_size: int, stride: int = 1, dilation_rate: int = 1
) -> int:
    if padding == "semicausal_full":
        return 0
    return conv_input_latency(padding, kernel_size, dilation_rate) // stride


def conv_buffer_width(
    padding: str, kernel_size: int, stride: int = 1, dilation_rate: int = 1
) -> int:
    """Past input frames a stepping conv keeps. Always equals
    `left_pad + output_latency * stride`, which is what lines step windows up
    with layer windows."""
    k = effective_kernel_size(kernel_size, dilation_rate)
    match padding:
        case "causal" | "causal_valid":
            return k - 1
        case "reverse_causal" | "reverse_causal_valid":
            return (k - 1) // stride * stride
        case "semicausal":
            return max(k - stride, 0)
    raise ValueError(f"padding={padding!r} is not steppable; use one of {STEPPABLE_CONV_PADDINGS}.")


def conv_step_reads_buffer_mask(padding: str) -> bool:
    """Whether a stepping conv's output mask depends on its buffer's mask.

    `*_valid` modes AND the window's mask, and reverse-causal outputs lag
    their block by the buffer. Causal and semicausal buffers are exactly the
    left padding, so output j takes the mask of block frame j * stride.
    """
    return padding in (*_AND_MODES, "reverse_causal")


def conv_initial_buffer_valid(padding: str) -> bool:
    """Whether a stepping conv's initial buffer frames count as valid.

    Only `causal_valid` treats its front padding as valid frames in `layer`.
    The reference also marks `reverse_causal_valid` buffers valid; that makes
    the leading latency outputs valid in `step`, so a stateful layer after it
    consumes frames `layer` never produces. Here they are invalid.
    """
    return padding == "causal_valid"


def conv_output_length(
    time: int, padding: str, kernel_size: int, stride: int = 1, dilation_rate: int = 1
) -> int:
    left, right = convolution_explicit_padding(padding, kernel_size, stride, dilation_rate)
    k = effective_kernel_size(kernel_size, dilation_rate)
    return max(0, (time + left + right - k) // stride + 1)


def conv_receptive_field_per_step(
    kernel_size: int, stride: int, dilation_rate: int, padding: str
) -> dict[int, ReceptiveField]:
    left, _ = convolution_explicit_padding(padding, kernel_size, stride, dilation_rate)
    k = effective_kernel_size(kernel_size, dilation_rate)
    return {0: (-left, -left + k - 1)}


def _window_reduce(mask: jax.Array, k: int, stride: int, dilation: int, use_and: bool) -> jax.Array:
    m = mask.astype(jnp.int32)
    if use_and:
        out = jax.lax.reduce_window(
            m, 1, jax.lax.min, (1, k), (1, stride), "VALID", window_dilation=(1, dilation)
        )
    else:
        out = jax.lax.reduce_window(
            m, 0, jax.lax.max, (1, k), (1, stride), "VALID", window_dilation=(1, dilation)
        )
    return out.astype(MASK_DTYPE)


def compute_conv_mask(
    mask: jax.Array,
    kernel_size: int,
    stride: int,
    dilation_rate: int,
    padding: str,
    is_step: bool,
) -> jax.Array:
    """Output mask of a convolution-like layer.

    In `layer` mode `mask` is the input mask; in step mode it is the mask of
    `buffer ++ block`, already covering the padding.
    - `*valid` modes: a window is valid iff all its frames are.
    - `semicausal_full`: valid iff any frame is.
    - others: output j is valid iff input `j * stride` is.
    """
    padding = validate_padding(padding)
    k = effective_kernel_size(kernel_size, dilation_rate)
    left, right = convolution_explicit_padding(padding, kernel_size, stride, dilation_rate)
    if padding in _AND_MODES or padding == "semicausal_full":
        if not is_step:
            front_valid = padding == "causal_valid"
            mask = jnp.concatenate(
                [
                    jnp.full((mask.shape[0], left), front_valid, MASK_DTYPE),
                    mask,
                    jnp.zeros((mask.shape[0], right), MASK_DTYPE),
                ],
                axis=1,
            )
        if mask.shape[1] < k:
            return jnp.zeros((mask.shape[0], 0), MASK_DTYPE)
        # The window has kernel_size taps spaced by the dilation (spanning k).
        return _window_reduce(
            mask, kernel_size, stride, dilation_rate, use_and=padding != "semicausal_full"
        )
    if not is_step:
        return mask[:, ::stride]
    # Step: `mask` is buffer ++ block, the buffer being `left` frames plus the
    # output-latency frames; output j sits at `j * stride + left`.
    out_len = (
        mask.shape[1] - conv_buffer_width(padding, kernel_size, stride, dilation_rate)
    ) // stride
    return mask[:, left : left + out_len * stride : stride]


# Composition (REFERENCE section 1 and 3) -----------------------------------


class _Structural(Protocol):
    @property
    def block_size(self) -> int: ...
    @property
    def output_ratio(self) -> Fraction: ...
    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]: ...
    def get_accumulated_input_latency(self, input_latency: int) -> int: ...
    def get_accumulated_output_latency(self, output_latency: int) -> int: ...


def serial_input_latency(layers: PySequence[_Structural]) -> int:
    latency = 0
    for layer in reversed(layers):
        latency = layer.get_accumulated_input_latency(latency)
    return latency


def serial_output_latency(layers: PySequence[_Structural]) -> int:
    latency = 0
    for layer in layers:
        latency = layer.get_accumulated_output_latency(latency)
    return latency


def serial_output_ratio(layers: PySequence[_Structural]) -> Fraction:
    ratio = Fraction(1)
    for layer in layers:
        ratio *= layer.output_ratio
    return ratio


def serial_block_size(layers: PySequence[_Structural]) -> int:
    """Smallest input block that gives every layer a whole block."""
    block, ratio = Fraction(1), Fraction(1)
    for layer in layers:
        # In input frames, layer i needs multiples of block_i / ratio-so-far;
        # lcm over rationals: lcm(numerators) / gcd(denominators).
        need = Fraction(layer.block_size) / ratio
        block = Fraction(
            math.lcm(block.numerator, need.numerator),
            math.gcd(block.denominator, need.denominator),
        )
        ratio *= layer.output_ratio
    if block.denominator != 1:
        raise ValueError(f"Serial block size is not an integer: {block}.")
    return int(block)


def _floor_div(t: int, ratio: Fraction) -> int:
    return math.floor(Fraction(t) / ratio)


def _compose_two(
    first: dict[int, ReceptiveField],
    first_ratio: Fraction,
    second: dict[int, ReceptiveField],
    second_ratio: Fraction,
) -> dict[int, ReceptiveField]:
    """Receptive field of `first` then `second`, per output step of `second`."""
    n_first, n_second = len(first), len(second)
    ratio = first_ratio * second_ratio
    # The per-step pattern repeats every n output steps, where n is a multiple
    # of n_second that moves the first layer by whole patterns and whole frames.
    n = n_second
    while not (
        (Fraction(n) / second_ratio).denominator == 1
        and int(Fraction(n) / second_ratio) % n_first == 0
        and (Fraction(n) / ratio).denominator == 1
    ):
        n += n_second
        if n > 10_000:
            raise ValueError("Receptive field pattern does not repeat; ratios are inconsistent.")
    # Scanning a finite window of positions finds the extremes of an infinite
    # range too: the pattern repeats, so the extremes sit within one period.
    period = n_first * max(1, first_ratio.denominator) * max(1, first_ratio.numerator)

    def first_range(q: int) -> ReceptiveField:
        rf = first[q % n_first]
        if rf is None:
            return None
        base = _floor_div(q, first_ratio)
        return (base + rf[0], base + rf[1])

    result: dict[int, ReceptiveField] = {}
    for to in range(n):
        rf2 = second[to % n_second]
        if rf2 is None:
            result[to] = None
            continue
        base = _floor_div(to, second_ratio)
        lo, hi = base + rf2[0], base + rf2[1]
        qs: list[int] = []
        if math.isinf(lo) and math.isinf(hi):
            qs = list(range(-period, period + 1))
        elif math.isinf(lo):
            qs = list(range(int(hi) - period, int(hi) + 1))
        elif math.isinf(hi):
            qs = list(range(int(lo), int(lo) + period + 1))
        else:
            qs = list(range(int(lo), int(hi) + 1))
        rf = union_receptive_fields(first_range(q) for q in qs)
        if rf is None:
            result[to] = None
            continue
        start, end = rf
        if math.isinf(lo) and not math.isinf(start) and _reaches(first):
            start = -math.inf
        if math.isinf(hi) and not math.isinf(end) and _reaches(first):
            end = math.inf
        shift = _floor_div(to, ratio)
        result[to] = (start - shift, end - shift)
    return result


def _reaches(rf: dict[int, ReceptiveField]) -> bool:
    return any(r is not None for r in rf.values())


def serial_receptive_field_per_step(
    layers: PySequence[_Structural],
) -> dict[int, ReceptiveField]:
    if not layers:
        return {0: (0, 0)}
    rf = layers[0].receptive_field_per_step
    ratio = layers[0].output_ratio
    for layer in layers[1:]:
        rf = _compose_two(rf, ratio, layer.receptive_field_per_step, layer.output_ratio)
        ratio *= layer.output_ratio
    return rf


def parallel_receptive_field_per_step(
    fields: Iterable[dict[int, ReceptiveField]],
) -> dict[int, ReceptiveField]:
    fields = list(fields)
    n = math.lcm(*(len(f) for f in fields))
    return {step: union_receptive_fields(f[step % len(f)] for f in fields) for step in range(n)}


# Config-level queries ------------------------------------------------------


def get_input_latency(config: SequenceLayerConfig) -> int:
    return detached(config).input_latency


def get_output_latency(config: SequenceLayerConfig) -> int:
    return detached(config).output_latency


def get_output_ratio(config: SequenceLayerConfig) -> Fraction:
    return detached(config).output_ratio


def get_block_size(config: SequenceLayerConfig) -> int:
    return detached(config).block_size


# Running helpers -----------------------------------------------------------


def batch_where(cond: jax.Array, new: Any, old: Any) -> Any:
    """Per batch row, `new` where `cond[b]` else `old`, over matching pytrees
    whose leaves are batch-major."""

    def pick(n: jax.Array, o: jax.Array) -> jax.Array:
        c = cond.reshape(cond.shape + (1,) * (n.ndim - 1))
        return jnp.where(c, n, o)

    return jax.tree.map(pick, new, old)


def step_by_step_static(
    layer: SequenceLayer,
    x: Sequence,
    *,
    training: bool,
    constants: Constants | None = None,
    blocks_per_step: int = 1,
    initial_state: Any = None,
    with_emits: bool = False,
) -> tuple[Sequence, Any, Any]:
    """Runs `layer.step` over `x` in a Python loop of `block_size *
    blocks_per_step` frames (the tail is padded with invalid frames).

    Returns `(y, final_state, emits)`; emits is a list, one per step, when
    `with_emits` else `()`.
    """
    block = layer.block_size * blocks_per_step
    x = x.pad_to_multiple(block)
    state = initial_state
    if state is None:
        state = layer.get_initial_state(
            x.shape[0], x.channel_spec, training=training, constants=constants
        )
    outputs: list[Sequence] = []
    emits: list[Any] = []
    for start in range(0, x.shape[1], block):
        chunk = x[:, start : start + block]
        if with_emits:
            y, state, e = layer.step_with_emits(
                chunk, state, training=training, constants=constants
            )
            emits.append(e)
        else:
            y, state = layer.step(chunk, state, training=training, constants=constants)
        outputs.append(y)
    if not outputs:
        spec = layer.get_output_spec(x.channel_spec, constants=constants)
        empty = jnp.zeros((x.shape[0], 0, *spec.shape), spec.dtype)
        return Sequence(empty, jnp.zeros((x.shape[0], 0), MASK_DTYPE)), state, emits
    return Sequence.concatenate_sequences(outputs), state, (emits if with_emits else ())


def as_padding_mode(padding: str | PaddingMode) -> str:
    return validate_padding(padding)
