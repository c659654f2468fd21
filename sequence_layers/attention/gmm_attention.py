"""Gaussian-mixture (location-based) attention to a source sequence."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sequence_layers.attention import common
from sequence_layers.sequence import Sequence
from sequence_layers.types import (
    ChannelSpec,
    Constants,
    Emits,
    Emitting,
    PreservesType,
    ReceptiveField,
    SequenceLayerConfig,
    ShapeLike,
    State,
)


class _HeadwiseOutput(nn.Module):
    """`[..., heads, units] -> [..., heads, components, 3]` with a per-head kernel
    `[heads, units, components, 3]` (the reference's `output` layer)."""

    num_components: int
    use_bias: bool
    kernel_init: Any
    bias_init: Any
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        heads, units = x.shape[-2:]
        kernel = self.param("kernel", self.kernel_init, (heads, units, self.num_components, 3))
        y = jnp.einsum("...nu,nucl->...ncl", x, kernel.astype(x.dtype), precision=self.precision)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (heads, self.num_components, 3))
            y = y + bias.astype(x.dtype)
        return y


class GmmAttention(PreservesType, Emitting):
    """Multi-head Gaussian-mixture attention (Graves 2013; arXiv:1910.10288).

    Each frame of `x [b, t, d]` predicts, per head, a mixture of
    `num_components` Gaussians over source positions; the output is the
    mixture-weighted sum of the raw source frames:
    `[b, t, num_heads, source_channels]` (no value projection). With
    `monotonic=True` component means only move forward: each valid frame adds a
    softplus offset to the previous means (state `[b, 1, heads, components]`), so
    the receptive field is `(-inf, 0)`; otherwise frames are independent.

    Emits `CrossAttentionEmits({source_name: weights [b, t, heads, s]})`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(SequenceLayerConfig):
        # Constants key of the source Sequence [b, s, d_src].
        source_name: str
        # Number of attention heads.
        num_heads: int
        # Hidden units per head of the mixture-parameter MLP.
        units_per_head: int
        # Gaussian components per head.
        num_components: int
        # Whether component means only move forward over time.
        monotonic: bool
        # Einsum precision.
        precision: Any = None
        # Initializer of the hidden layer kernel [d, heads, units].
        hidden_kernel_init: Any = nn.linear.default_kernel_init
        # Accepted for compatibility with the reference; sharding is not applied.
        hidden_kernel_sharding: Any = None
        # Initializer of the output kernel [heads, units, components, 3].
        output_kernel_init: Any = nn.linear.default_kernel_init
        # Whether the output layer has a bias.
        output_use_bias: bool = True
        # Initializer of the output bias.
        output_bias_init: Any = common.zeros_init
        # Accepted for compatibility with the reference; sharding is not applied.
        output_bias_sharding: Any = None
        output_kernel_sharding: Any = None
        # Added to the offset logits.
        init_offset_bias: float = 0.0
        # Added to the scale logits.
        init_scale_bias: float = 0.0
        # If > 0, each step's offset saturates at this many source frames.
        max_offset: float = -1.0
        # Layer name.
        name: str | None = None

        def make(self) -> GmmAttention:
            return GmmAttention(self, name=self.name)

    config: Config

    def setup(self) -> None:
        cfg = self.config
        name = type(self).__name__
        if not cfg.source_name:
            raise ValueError(f"{name}: source_name must be a non-empty string.")
        common.validate_heads(cfg.num_heads, cfg.units_per_head, name)
        if cfg.num_components <= 0:
            raise ValueError(f"{name}: num_components must be > 0, got {cfg.num_components=}.")
        self._hidden = common.EinsumProjection(
            output_shape=(cfg.num_heads, cfg.units_per_head),
            use_bias=False,
            kernel_init=cfg.hidden_kernel_init,
            bias_init=common.zeros_init,
            param_dtype=jnp.float32,
            compute_dtype=None,
            precision=cfg.precision,
            name="hidden",
        )
        self._output = _HeadwiseOutput(
            num_components=cfg.num_components,
            use_bias=cfg.output_use_bias,
            kernel_init=cfg.output_kernel_init,
            bias_init=cfg.output_bias_init,
            precision=cfg.precision,
            name="output",
        )

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        return {0: (-math.inf if self.config.monotonic else 0, 0)}

    @nn.nowrap
    def get_output_shape(
        self, input_shape: ShapeLike, *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        if len(input_shape) != 1:
            raise ValueError(
                f"GmmAttention needs inputs [b, t, d], got channel shape {tuple(input_shape)}."
            )
        source = common.get_source("GmmAttention", self.config.source_name, constants)
        # The output carries raw source channels: there is no value projection.
        return (self.config.num_heads, source.shape[2])

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        if not self.config.monotonic:
            return ()
        # Component means, starting at source position 0.
        shape = (batch_size, 1, self.config.num_heads, self.config.num_components)
        return jnp.zeros(shape, input_spec.dtype)

    def _mixture(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Priors, offsets and variances `[b, t, heads, components]`."""
        cfg = self.config
        hidden = nn.relu(self._hidden(x))
        logits = self._output(hidden)
        prior_logits, offset_logits, scale_logits = (logits[..., i] for i in range(3))
        offset_logits = offset_logits + cfg.init_offset_bias
        scale_logits = scale_logits + cfg.init_scale_bias
        priors = jax.nn.softmax(prior_logits.astype(common.at_least_float32(prior_logits.dtype)))
        priors = priors.astype(prior_logits.dtype)
        variances = jnp.square(jax.nn.softplus(scale_logits))
        offsets = jax.nn.softplus(offset_logits)
        if cfg.max_offset > 0:
            # softplus(x) - softplus(x - M): ~linear in [0, M], saturating outside.
            offsets = offsets - jax.nn.softplus(offset_logits - cfg.max_offset)
        return priors, offsets, variances

    def _weights(
        self, source: Sequence, priors: jax.Array, means: jax.Array, variances: jax.Array
    ) -> jax.Array:
        """Mixture densities over source positions: `[b, t, heads, s]`."""
        positions = jnp.arange(source.shape[1], dtype=means.dtype)[None, None, None, :, None]
        # Scaled by sqrt(2 pi var) exactly as the reference (so trained models
        # port); this is a scaled density, not a normalized one.
        priors = priors * jnp.sqrt(2 * np.pi * variances + 1e-8)
        densities = priors[:, :, :, None, :] * jnp.exp(
            -jnp.square(positions - means[:, :, :, None, :])
            / (2 * variances[:, :, :, None, :] + 1e-9)
        )
        weights = jnp.sum(densities, axis=-1)
        return jnp.where(source.mask[:, None, None, :], weights, jnp.zeros((), weights.dtype))

    def _run(
        self, x: Sequence, state: State, constants: Constants | None
    ) -> tuple[Sequence, State, Emits]:
        cfg = self.config
        self.get_output_shape(x.channel_shape, constants=constants)
        source = common.clear_invalid(
            common.get_source(type(self).__name__, cfg.source_name, constants)
        )
        x = common.clear_invalid(x)
        priors, offsets, variances = self._mixture(x.values)
        if cfg.monotonic:
            # Means advance only on valid frames, so padding never moves them.
            valid = x.mask[:, :, None, None]
            steps = jnp.where(valid, offsets, jnp.zeros((), offsets.dtype))
            means = state.astype(offsets.dtype) + jnp.cumsum(steps, axis=1)
            state = means[:, -1:].astype(state.dtype)
        else:
            means = offsets
        weights = self._weights(source, priors, means, variances)
        context = jnp.einsum(
            "bqns,bsd->bqnd", weights, source.values.astype(weights.dtype), precision=cfg.precision
        )
        y = Sequence(context.astype(x.dtype), x.mask)
        emits = common.CrossAttentionEmits({cfg.source_name: Sequence(weights, x.mask)})
        return y, state, emits

    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, Emits]:
        state = self.get_initial_state(x.shape[0], x.channel_spec, training=training)
        y, _, emits = self._run(x, state, constants)
        return y, emits

    def step_with_emits(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        # Not wrapped in types.check_step_with_emits: the output shape depends on
        # the source in `constants`, which the core checks do not pass on.
        return self._run(x, state, constants)
