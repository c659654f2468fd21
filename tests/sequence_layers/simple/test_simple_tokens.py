"""Token layers: one-hot, embeddings (tied or not), argmax."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import MaskedSequence, Sequence, simple, testing

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


def test_argmax(verify) -> None:
    x = Sequence.from_values(jnp.array([[[0.1, 0.9, 0.3], [2.0, -1.0, 1.0]]]))
    layer = simple.Argmax.Config().make()
    y = layer.apply({}, x)
    np.testing.assert_array_equal(y.values, [[1, 0]])
    assert y.dtype == jnp.int32 == layer.get_output_dtype(jnp.float32)
    verify(simple.Argmax.Config(), testing.random_sequence(2, 5, 4, seed=11), test_gradients=False)
