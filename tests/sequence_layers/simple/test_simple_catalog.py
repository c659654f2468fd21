"""The whole simple + dense catalog: exports, hashable configs, JSON round trips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import combinators, dense, serialization, simple, testing, types

FLOAT = testing.random_sequence(2, 4, 4, seed=30)
IDS = testing.random_sequence(2, 4, dtype=jnp.int32, low=0, high=5, seed=31)

# One config per class, with the input it runs on.
CATALOG: list[tuple[types.SequenceLayerConfig, object]] = [
    (simple.Identity.Config(), FLOAT),
    (simple.MaskInvalid.Config(), FLOAT),
    (simple.StopGradient.Config(), FLOAT),
    (simple.GradientClipping.Config(1.0), FLOAT),
    (simple.OptimizationBarrier.Config(), FLOAT),
    (simple.ApplySharding.Config(("data", None, None)), FLOAT),
    (simple.CheckpointName.Config("tag"), FLOAT),
    (simple.Logging.Config("log"), FLOAT),
    (simple.Emit.Config(), FLOAT),
    (simple.NamedEmit.Config("tap"), FLOAT),
    (simple.Abs.Config(), FLOAT),
    (simple.Cast.Config(jnp.bfloat16), FLOAT),
    (simple.Elu.Config(0.5), FLOAT),
    (simple.Exp.Config(), FLOAT),
    (simple.Gelu.Config(False), FLOAT),
    (simple.LeakyRelu.Config(0.2), FLOAT),
    (simple.Log.Config(), FLOAT),
    (simple.Power.Config(2.0), FLOAT),
    (simple.Relu.Config(), FLOAT),
    (simple.Sigmoid.Config(), FLOAT),
    (simple.Softplus.Config(), FLOAT),
    (simple.Swish.Config(), FLOAT),
    (simple.Tanh.Config(), FLOAT),
    (simple.Softmax.Config(-1), FLOAT),
    (simple.PRelu.Config(0.1), FLOAT),
    (simple.Snake.Config(True), FLOAT),
    (simple.Scale.Config([1.0, 2.0, 3.0, 4.0]), FLOAT),
    (simple.Add.Config(1.5), FLOAT),
    (simple.Maximum.Config(0.0), FLOAT),
    (simple.Minimum.Config(0.5), FLOAT),
    (simple.Mod.Config(0.75), FLOAT),
    (simple.Affine.Config(shape=(4,)), FLOAT),
    (simple.Mean.Config(), FLOAT),
    (simple.Min.Config(keepdims=True), FLOAT),
    (simple.Max.Config(axis=None), FLOAT),
    (simple.Sum.Config(axis=(2,)), FLOAT),
    (simple.GatedUnit.Config(jax.nn.relu, jax.nn.sigmoid), FLOAT),
    (simple.GatedLinearUnit.Config(), FLOAT),
    (simple.GatedTanhUnit.Config(), FLOAT),
    (simple.Slice.Config([(1, None, 2)]), FLOAT),
    (simple.Flatten.Config(), FLOAT),
    (simple.ExpandDims.Config(-1), FLOAT),
    (simple.Reshape.Config((2, 2)), FLOAT),
    (simple.Transpose.Config(), FLOAT),
    (simple.SwapAxes.Config(2, -1), FLOAT),
    (simple.MoveAxis.Config(2, 2), FLOAT),
    (simple.Squeeze.Config(), FLOAT),
    (simple.EinopsRearrange.Config("(a b) -> b a", {"a": 2}), FLOAT),
    (simple.GlobalReshape.Config((8, 2)), FLOAT),
    (simple.GlobalEinopsRearrange.Config("(t k) c -> t (k c)", {"k": 2}), FLOAT),
    (simple.OneHot.Config(5), IDS),
    (simple.Embedding.Config(3, 5), IDS),
    # An unparented Embedding module: a table of its own, written as its config.
    (simple.EmbeddingTranspose.Config(simple.Embedding.Config(4, 5).make()), FLOAT),
    (simple.Argmax.Config(), FLOAT),
    (simple.Dropout.Config(0.5, (1,)), FLOAT),
    (simple.AddNoise.Config(simple.AddNoise.Normal(0.0, 1.0), training_only=True), FLOAT),
    (simple.Lambda.Config(jnp.tanh, mask_required=False), FLOAT),
    (simple.Downsample1D.Config(2), FLOAT),
    (simple.Upsample1D.Config(2), FLOAT),
    (simple.Upsample2D.Config((2, 1)), testing.random_sequence(2, 4, 2, 2, seed=32)),
    (dense.Dense.Config(3, activation=jax.nn.gelu, param_dtype=jnp.bfloat16), FLOAT),
    (dense.DenseShaped.Config((2, 3), use_bias=False), FLOAT),
    (dense.EinsumDense.Config("...a,ab->...b", (3,), bias_axes="b"), FLOAT),
]
NAMES = [type(c).__qualname__.split(".")[0] for c, _ in CATALOG]


def test_simple_exports_the_reference_catalog() -> None:
    exported = {n for n in dir(simple) if isinstance(getattr(simple, n), type)}
    layers = {n for n in exported if issubclass(getattr(simple, n), types.SequenceLayer)}
    assert layers == set(NAMES) - {"Dense", "DenseShaped", "EinsumDense"}
    assert len(layers) == 60


@pytest.mark.parametrize(("config", "x"), CATALOG, ids=NAMES)
def test_config_round_trips_with_identical_outputs(config, x) -> None:
    hash(config)
    assert type(config.make()).Config is type(config)
    restored = serialization.loads(serialization.dumps(config))
    assert restored == config and hash(restored) == hash(config)
    layer = config.make()
    variables = layer.init(jax.random.PRNGKey(0), x)
    y = layer.apply(variables, x)
    y_restored = restored.make().apply(variables, x)
    np.testing.assert_array_equal(y.values, y_restored.values)
    np.testing.assert_array_equal(y.mask, y_restored.mask)


def test_embedding_transpose_serializes_in_both_forms() -> None:
    # Tied by name to an enclosing Embedding: a plain nested config (version 1).
    embed = simple.Embedding.Config(4, 5, name="embed")
    tied = combinators.Serial.Config([embed, simple.EmbeddingTranspose.Config(embed)])
    d = serialization.to_dict(tied)
    assert d["version"] == 1
    assert d["config"]["fields"]["layers"]["tuple"][1]["fields"]["embedding"]["type"] == "Embedding"
    restored = serialization.from_dict(d)
    assert restored == tied and hash(restored) == hash(tied)
    # An unparented module: its config under the "module" tag (version 2).
    own = simple.EmbeddingTranspose.Config(simple.Embedding.Config(4, 5).make())
    d = serialization.to_dict(own)
    assert d["version"] == 2
    assert d["config"]["fields"]["embedding"] == {
        "module": serialization.to_dict(own.embedding.config)["config"]
    }
    assert serialization.from_dict(d) == own


def test_layer_modules_that_cannot_be_rebuilt_do_not_serialize() -> None:
    renamed = simple.Embedding(simple.Embedding.Config(4, 5), name="other")
    with pytest.raises(serialization.SerializationError, match=r"not be rebuilt by config\.make"):
        serialization.dumps(simple.EmbeddingTranspose.Config(renamed))
    bound = simple.Embedding.Config(4, 5).make().bind({})
    with pytest.raises(serialization.SerializationError, match="belongs to variables"):
        serialization.dumps(simple.EmbeddingTranspose.Config(bound))
