"""Layers that work inside each frame: `PerFrame` runs a layer along a
frame's inner axis, `FramePad` pads that axis.

Models that cut a stream into frames (`Frame`) and then run a small network
over the samples of each frame on its own (Silero VAD: an STFT and convs over
the 576 samples of each 32 ms window) need both. Across frames such a model
is pointwise: all of its memory lives in the layers after the per-frame part
(an LSTM), so `PerFrame` is stateless and streams with any block size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers import types
from sequence_layers.sequence import MASK_DTYPE, ChannelSpec, MaskedSequence, Sequence
from sequence_layers.types import Constants

__all__ = ["FramePad", "PerFrame"]

PadMode = Literal["constant", "reflect", "symmetric", "edge"]
_PAD_MODES = ("constant", "reflect", "symmetric", "edge")


@functools.lru_cache(maxsize=256)
def _inner_output_spec(config: types.SequenceLayerConfig, spec: ChannelSpec) -> ChannelSpec:
    """Channel spec of `config`'s `layer()` on one frame `[n, *c]` taken as a
    sequence: traced only (`eval_shape`), so nothing runs.

    The inner length is not `n * output_ratio` in general (a `valid` conv
    drops its edges), so it is measured, not computed from the ratio.
    """
    layer = types.detached(config)
    values = jax.ShapeDtypeStruct((1, *spec.shape), spec.dtype)

    def run(v: jax.Array) -> jax.Array:
        x = Sequence.from_values(v)
        y, _ = layer.init_with_output(jax.random.PRNGKey(0), x, training=False)
        return y.values

    out = jax.eval_shape(run, values)
    return ChannelSpec(tuple(out.shape[1:]), out.dtype)


class PerFrame(types.Stateless):
    """Runs `layer` along the inner axis of every frame, each frame on its own:
    `[b, t, n, *c] -> [b, t, n', *c']`, where `layer.layer()` maps a sequence
    `[n, *c]` to `[n', *c']`.

    Each frame becomes a batch row of its own, all of its `n` inner frames
    valid, so the child sees a whole sequence and may use layers that cannot
    step (`valid` convolutions, `same` strided convs). Inner frames the child
    marks invalid are zeroed. Parameters are shared by every frame and live
    under `child_layer`. Constants are not passed on: the inner sequence has a
    different batch and time than the outer one.

    Across frames this is pointwise (receptive field (0, 0), no state), so it
    steps with any block size.

    Example (a per-frame conv encoder over 64-sample frames):
        >>> import sequence_layers as sl
        >>> encoder = sl.Serial.Config([
        ...     sl.Frame.Config(64, 64, padding="causal_valid"),            # [b, t/64, 64, 1]
        ...     sl.PerFrame.Config(
        ...         sl.Conv1D.Config(8, kernel_size=16, strides=8, padding="valid")
        ...     ),                                                           # [b, t/64, 7, 8]
        ... ])
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The layer run over each frame's inner axis (only its `layer()` is used).
        layer: types.SequenceLayerConfig
        # Optional module name.
        name: str | None = None

        def __post_init__(self) -> None:
            if not isinstance(self.layer, types.SequenceLayerConfig):
                raise TypeError(
                    f"PerFrame.Config.layer must be a layer Config, got {type(self.layer)!r}."
                )

        def make(self) -> PerFrame:
            return PerFrame(self, name=self.name)

    config: Config

    def setup(self) -> None:
        self.child_layer = self.config.layer.make()

    @nn.nowrap
    def get_output_spec(
        self, input_spec: ChannelSpec, *, constants: Constants | None = None
    ) -> ChannelSpec:
        if len(input_spec.shape) < 1:
            raise ValueError(
                f"PerFrame needs frames with an inner axis, [b, t, n, *c]; got channel shape "
                f"{tuple(input_spec.shape)}. Put a Frame (or Reshape) before it."
            )
        spec = ChannelSpec(tuple(input_spec.shape), input_spec.dtype)
        return _inner_output_spec(self.config.layer, spec)

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        return tuple(self.get_output_spec(ChannelSpec(tuple(input_shape), jnp.float32)).shape)

    @types.check_layer
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        b, t = x.shape[:2]
        x = x.mask_invalid()
        inner_values = x.values.reshape((b * t, *x.channel_shape))
        inner = Sequence(inner_values, jnp.ones(inner_values.shape[:2], MASK_DTYPE))
        y = self.child_layer.layer(inner, training=training).mask_invalid()
        values = y.values.reshape((b, t, *y.values.shape[1:]))
        # Invalid outer frames were zeros in, but the child may add a bias.
        values = jnp.where(x.expanded_mask(), values, jnp.zeros((), values.dtype))
        return MaskedSequence(values, x.mask)


class FramePad(types.PreservesType, types.Stateless):
    """Pads the inner axis of every frame: `[b, t, n, *c] -> [b, t, left + n + right, *c]`.

    `mode` as `numpy.pad`: `constant` (zeros), `reflect` (mirror without the
    edge sample, as PyTorch's `reflect`), `symmetric` (with it) or `edge`.
    All of them keep a zero frame zero, so masked inputs stay masked.

    Example (Silero VAD pads each 576-sample window by 64 reflected samples):
        >>> import sequence_layers as sl
        >>> pad = sl.FramePad.Config((0, 64), mode="reflect").make()
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Samples added before and after each frame's inner axis.
        padding: tuple[int, int]
        # How the added samples are filled (see the class docstring).
        mode: PadMode = "constant"
        # Optional module name.
        name: str | None = None

        def __post_init__(self) -> None:
            left, right = (int(p) for p in self.padding)
            if left < 0 or right < 0:
                raise ValueError(f"FramePad padding must be non-negative, got {self.padding}.")
            object.__setattr__(self, "padding", (left, right))
            if self.mode not in _PAD_MODES:
                raise ValueError(f"FramePad mode {self.mode!r} is not one of {_PAD_MODES}.")

        def make(self) -> FramePad:
            return FramePad(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        if len(input_shape) < 1:
            raise ValueError(
                f"FramePad needs frames with an inner axis, [b, t, n, *c]; got channel shape "
                f"{tuple(input_shape)}."
            )
        n = input_shape[0]
        left, right = self.config.padding
        if self.config.mode == "reflect" and max(left, right) >= n:
            raise ValueError(
                f"FramePad reflect padding {self.config.padding} needs frames longer than "
                f"{max(left, right)} samples, got {n}."
            )
        return (left + n + right, *input_shape[1:])

    @types.check_layer
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        self.get_output_shape(x.channel_shape)
        widths = [(0, 0), (0, 0), self.config.padding] + [(0, 0)] * (x.ndim - 3)
        return x.apply_values_masked(jnp.pad, widths, mode=self.config.mode)
