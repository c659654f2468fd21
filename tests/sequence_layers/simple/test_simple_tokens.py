"""Token layers: one-hot, embeddings (tied or not), argmax."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import MaskedSequence, Sequence, serialization, simple, testing
from sequence_layers.combinators import Residual, Serial
from sequence_layers.dense import Dense

IDS = testing.random_sequence(2, 6, dtype=jnp.int32, low=0, high=5, seed=9)


def test_one_hot() -> None:
    x = Sequence.from_values(jnp.array([[0, 2, 7]], jnp.int32))
    layer = simple.OneHot.Config(3, compute_dtype=jnp.bfloat16).make()
    y = layer.apply({}, x)
    np.testing.assert_array_equal(y.values[0], [[1, 0, 0], [0, 0, 1], [0, 0, 0]])
    assert y.dtype == jnp.bfloat16 == layer.get_output_dtype(jnp.int32)
    assert not isinstance(y, MaskedSequence)


def test_embedding_looks_up_rows() -> None:
    layer = simple.Embedding.Config(dimension=3, num_embeddings=5).make()
    variables = layer.init(jax.random.PRNGKey(0), IDS)
    table = variables["params"]["embedding"]
    assert table.shape == (5, 3)
    y = layer.apply(variables, IDS)
    np.testing.assert_array_equal(y.values, np.asarray(table)[np.asarray(IDS.values)])
    assert y.channel_shape == (3,) and y.dtype == jnp.float32


def test_embedding_dtypes_and_param_name() -> None:
    config = simple.Embedding.Config(3, 5, compute_dtype=jnp.bfloat16, embedding_param_name="table")
    layer = config.make()
    variables = layer.init(jax.random.PRNGKey(0), IDS)
    assert set(variables["params"]) == {"table"}
    assert layer.apply(variables, IDS).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "config",
    [simple.OneHot.Config(5), simple.Embedding.Config(3, 5)],
    ids=["OneHot", "Embedding"],
)
def test_token_contract(verify, config) -> None:
    verify(config, IDS)


@pytest.mark.parametrize("config", [simple.OneHot.Config(5), simple.Embedding.Config(3, 5)])
def test_token_layers_reject_floats(config) -> None:
    with pytest.raises(ValueError, match="integer token ids"):
        config.make().get_output_dtype(jnp.float32)


def test_embedding_transpose_standalone(verify) -> None:
    embedding = simple.Embedding.Config(dimension=4, num_embeddings=6).make()
    x = testing.random_sequence(2, 5, 4, seed=10)
    layer, y = verify(simple.EmbeddingTranspose.Config(embedding), x, rf=True)
    params = layer.variables["params"]
    assert jax.tree.map(jnp.shape, params) == {"embedding": {"embedding": (6, 4)}, "bias": (6,)}
    expected = np.asarray(x.values) @ np.asarray(params["embedding"]["embedding"]).T
    np.testing.assert_allclose(
        y.values, np.where(x.mask[..., None], expected, 0), rtol=1e-5, atol=1e-5
    )
    assert y.channel_shape == (6,)


class _TiedModel(nn.Module):
    """Embeds ids and maps them back to logits with the same table."""

    def setup(self) -> None:
        self.embed = simple.Embedding.Config(dimension=4, num_embeddings=6).make()
        self.logits = simple.EmbeddingTranspose.Config(self.embed, use_bias=False).make()

    def __call__(self, ids: Sequence) -> Sequence:
        return self.logits.layer(self.embed.layer(ids, training=False), training=False)


def test_embedding_transpose_shares_the_table() -> None:
    model = _TiedModel()
    variables = model.init(jax.random.PRNGKey(0), IDS)
    assert jax.tree.map(jnp.shape, variables["params"]) == {"embed": {"embedding": (6, 4)}}
    table = np.asarray(variables["params"]["embed"]["embedding"])
    y = model.apply(variables, IDS)
    expected = table[np.asarray(IDS.values)] @ table.T
    np.testing.assert_allclose(y.values, expected, rtol=1e-5, atol=1e-5)


def test_embedding_transpose_checks_dimension() -> None:
    embedding = simple.Embedding.Config(dimension=4, num_embeddings=6).make()
    with pytest.raises(ValueError, match="embedding dimension 4"):
        simple.EmbeddingTranspose.Config(embedding).make().get_output_shape((3,))


# Tying by name: EmbeddingTranspose.Config(Embedding.Config(..., name=...)) -------

# A non-zero bias that serializes (a raw flax closure would load as an
# equivalent but unequal Initializer).
_BIAS_INIT = serialization.initializer("normal", stddev=1.0)
# Every id of a 6-row table; rows of length 2 to 4 of 6 (padding included).
TIED_IDS = testing.random_sequence(
    2, 6, dtype=jnp.int32, low=0, high=6, low_length=2, high_length=5, seed=13
)


def _embed(name: str | None = "embed", num_embeddings: int = 6) -> simple.Embedding.Config:
    return simple.Embedding.Config(dimension=4, num_embeddings=num_embeddings, name=name)


def _logits(**kwargs) -> simple.EmbeddingTranspose.Config:
    return simple.EmbeddingTranspose.Config(_embed(**kwargs), use_bias=True, bias_init=_BIAS_INIT)


def _assert_round_trip(config, variables, x: Sequence) -> None:
    restored = serialization.loads(serialization.dumps(config))
    assert restored == config and hash(restored) == hash(config)
    y = config.make().apply(variables, x)
    y_restored = restored.make().apply(variables, x)
    np.testing.assert_array_equal(y.values, y_restored.values)
    np.testing.assert_array_equal(y.mask, y_restored.mask)


def _param_paths(params) -> list[str]:
    return sorted("/".join(k.key for k in path) for path, _ in jax.tree.leaves_with_path(params))


def test_tied_by_name_in_a_serial(verify) -> None:
    config = Serial.Config([_embed(), simple.Tanh.Config(), _logits()])
    layer, y = verify(config, TIED_IDS)
    params = layer.variables["params"]
    # One table, in the Embedding layer; EmbeddingTranspose holds only its bias.
    assert jax.tree.map(jnp.shape, params) == {
        "embed": {"embedding": (6, 4)},
        "layers_2": {"bias": (6,)},
    }
    table = np.asarray(params["embed"]["embedding"])
    bias = np.asarray(params["layers_2"]["bias"])
    assert np.all(bias != 0)
    expected = np.tanh(table[np.asarray(TIED_IDS.values)]) @ table.T + bias
    valid = np.asarray(TIED_IDS.mask)
    assert valid.any() and not valid.all()
    np.testing.assert_allclose(np.asarray(y.values)[valid], expected[valid], rtol=1e-5, atol=1e-5)
    _assert_round_trip(config, layer.variables, TIED_IDS)


def test_tied_to_an_embedding_in_an_outer_layer(verify) -> None:
    # The EmbeddingTranspose's parent (the "head" Serial) has no Embedding:
    # the table is found one level up, in the outer Serial.
    head = Serial.Config([Residual.Config([Dense.Config(4)]), _logits()], name="head")
    config = Serial.Config([_embed(), head])
    layer, y = verify(config, TIED_IDS)
    params = layer.variables["params"]
    assert [p for p in _param_paths(params) if p.endswith("embedding")] == ["embed/embedding"]
    assert jax.tree.map(jnp.shape, params["head"]["layers_1"]) == {"bias": (6,)}
    table = np.asarray(params["embed"]["embedding"])
    dense = params["head"]["layers_0"]["layers_0"]
    e = table[np.asarray(TIED_IDS.values)]
    q = e + e @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
    expected = q @ table.T + np.asarray(params["head"]["layers_1"]["bias"])
    valid = np.asarray(TIED_IDS.mask)
    np.testing.assert_allclose(np.asarray(y.values)[valid], expected[valid], rtol=1e-5, atol=1e-5)
    _assert_round_trip(config, layer.variables, TIED_IDS)


def test_the_nearest_enclosing_embedding_wins() -> None:
    inner = Serial.Config([_embed(), _logits()], name="inner")
    config = Serial.Config([_embed(), _logits(), simple.Argmax.Config(), inner])
    layer = config.make()
    variables = layer.init(jax.random.PRNGKey(0), TIED_IDS)
    params = jax.tree.map(np.asarray, variables["params"])
    outer_table, inner_table = params["embed"]["embedding"], params["inner"]["embed"]["embedding"]
    assert not np.allclose(outer_table, inner_table)
    ids = np.argmax(
        outer_table[np.asarray(TIED_IDS.values)] @ outer_table.T + params["layers_1"]["bias"], -1
    )
    expected = inner_table[ids] @ inner_table.T + params["inner"]["layers_1"]["bias"]
    y = layer.apply(variables, TIED_IDS)
    valid = np.asarray(TIED_IDS.mask)
    np.testing.assert_allclose(np.asarray(y.values)[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_tied_in_a_shared_scope() -> None:
    config = Serial.Config([_embed(), _logits()], share_scope=True)
    variables = config.make().init(jax.random.PRNGKey(0), TIED_IDS)
    assert jax.tree.map(jnp.shape, variables["params"]) == {"embedding": (6, 4), "bias": (6,)}


def test_tied_shape_and_dtype_need_no_binding() -> None:
    layer = simple.EmbeddingTranspose.Config(
        simple.Embedding.Config(4, 6, param_dtype=jnp.bfloat16, name="embed")
    ).make()
    assert layer.get_output_shape((4,)) == (6,)
    assert layer.get_output_dtype(jnp.bfloat16) == jnp.bfloat16
    with pytest.raises(ValueError, match="embedding dimension 4"):
        layer.get_output_shape((3,))


def test_tying_by_name_needs_a_name() -> None:
    with pytest.raises(ValueError, match=r"needs a name .*pass an Embedding module"):
        simple.EmbeddingTranspose.Config(_embed(name=None))
    with pytest.raises(TypeError, match="must be an Embedding module or a named"):
        simple.EmbeddingTranspose.Config(simple.OneHot.Config(6))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "config",
    [
        _logits(),
        Serial.Config([_embed(name="other"), _logits()]),
        # Only ancestors' direct children count, not their descendants.
        Serial.Config([Serial.Config([_embed()]), _logits()]),
    ],
    ids=["standalone", "other_name", "not_a_direct_child"],
)
def test_tying_without_an_enclosing_embedding_fails(config) -> None:
    with pytest.raises(
        ValueError,
        match=r"found no enclosing Embedding layer named 'embed'.*pass an Embedding module "
        r"instead .* a table of its own",
    ):
        config.make().init(jax.random.PRNGKey(0), TIED_IDS)


def test_tying_to_a_different_config_fails() -> None:
    config = Serial.Config([_embed(num_embeddings=7), _logits()])
    with pytest.raises(ValueError, match=r"configs differ: the layer has .*num_embeddings=7"):
        config.make().init(jax.random.PRNGKey(0), TIED_IDS)


# Serializing the module form ------------------------------------------------------


def test_unparented_module_round_trips() -> None:
    config = simple.EmbeddingTranspose.Config(_embed(name=None).make(), use_bias=False)
    x = testing.random_sequence(2, 5, 4, seed=12)
    variables = config.make().init(jax.random.PRNGKey(0), x)
    # Using the config adopts a clone: its module stays unparented.
    assert config.embedding.parent is None and config.embedding.scope is None
    d = serialization.to_dict(config)
    assert d["version"] == 2
    assert d["config"]["fields"]["embedding"]["module"]["type"] == "Embedding"
    restored = serialization.from_dict(d)
    # A fresh module: flax modules compare by their fields (config, parent, name).
    assert restored.embedding is not config.embedding
    assert restored.embedding.parent is None
    _assert_round_trip(config, variables, x)


def test_parented_module_does_not_serialize() -> None:
    model = _TiedModel()
    bound = model.bind(model.init(jax.random.PRNGKey(0), TIED_IDS))
    config = bound.logits.config
    assert config.embedding.parent is not None
    with pytest.raises(
        serialization.SerializationError,
        match=r"belongs to _TiedModel.*EmbeddingTranspose\.Config\(embedding=Embedding\.Config\(",
    ):
        serialization.dumps(config)


def test_argmax(verify) -> None:
    x = Sequence.from_values(jnp.array([[[0.1, 0.9, 0.3], [2.0, -1.0, 1.0]]]))
    layer = simple.Argmax.Config().make()
    y = layer.apply({}, x)
    np.testing.assert_array_equal(y.values, [[1, 0]])
    assert y.dtype == jnp.int32 == layer.get_output_dtype(jnp.float32)
    verify(simple.Argmax.Config(), testing.random_sequence(2, 5, 4, seed=11), test_gradients=False)
