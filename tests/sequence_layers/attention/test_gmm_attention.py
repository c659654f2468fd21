"""GmmAttention."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest

from sequence_layers import testing
from sequence_layers.attention import CrossAttentionEmits, GmmAttention
from sequence_layers.sequence import Sequence
from sequence_layers.utils import step_by_step_static

B, T, S, D, DS, H, U, C = 2, 8, 7, 3, 5, 2, 4, 3


def bind(cfg: Any, x: Sequence, constants: dict) -> Any:
    layer = cfg.make()
    params = layer.init(
        jax.random.PRNGKey(0), x, training=False, constants=constants, method=layer.layer
    )
    return layer.bind(params)


@pytest.mark.parametrize("monotonic", [False, True])
def test_contract(monotonic: bool) -> None:
    x = testing.random_sequence(B, T, D, seed=1)
    constants = {"src": testing.random_sequence(B, S, DS, seed=2)}
    layer = bind(GmmAttention.Config("src", H, U, C, monotonic=monotonic), x, constants)
    assert layer.receptive_field_per_step == {0: (-np.inf if monotonic else 0, 0)}
    shapes = jax.tree.map(lambda a: a.shape, layer.variables["params"])
    assert shapes == {
        "hidden": {"kernel": (D, H, U)},
        "output": {"kernel": (H, U, C, 3), "bias": (H, C, 3)},
    }
    y = testing.verify_contract(layer, x, training=False, constants=constants, rtol=1e-5, atol=1e-5)
    assert y.shape == (B, T, H, DS)


def test_monotonic_means_only_move_forward() -> None:
    x = testing.random_sequence(B, T, D, random_lengths=False, seed=3)
    constants = {"src": testing.random_sequence(B, S, DS, random_lengths=False, seed=4)}
    layer = bind(GmmAttention.Config("src", H, U, C, monotonic=True), x, constants)
    _, state, _ = step_by_step_static(layer, x[:, :3], training=False, constants=constants)
    _, state2, _ = step_by_step_static(
        layer, x[:, 3:], training=False, constants=constants, initial_state=state
    )
    assert state.shape == (B, 1, H, C)
    assert np.all(np.asarray(state2) >= np.asarray(state))


def test_weights_against_numpy() -> None:
    x = testing.random_sequence(B, 2, D, random_lengths=False, seed=5)
    src = Sequence.from_lengths(testing.random_sequence(B, S, DS, seed=6).values, [S, 4])
    constants = {"src": src.mask_invalid()}
    layer = bind(GmmAttention.Config("src", H, U, 1, monotonic=False), x, constants)
    y, emits = layer.layer_with_emits(x, training=False, constants=constants)
    assert isinstance(emits, CrossAttentionEmits)
    p = layer.variables["params"]
    hidden = np.maximum(np.einsum("btd,dnu->btnu", np.asarray(x.values), p["hidden"]["kernel"]), 0)
    logits = np.einsum("btnu,nucl->btncl", hidden, p["output"]["kernel"]) + p["output"]["bias"]
    mean = np.log1p(np.exp(logits[..., 0, 1]))
    var = np.log1p(np.exp(logits[..., 0, 2])) ** 2
    pos = np.arange(S)
    w = np.sqrt(2 * np.pi * var + 1e-8)[..., None] * np.exp(
        -((pos - mean[..., None]) ** 2) / (2 * var[..., None] + 1e-9)
    )
    w = np.where(np.asarray(src.mask)[:, None, None, :], w, 0)
    np.testing.assert_allclose(emits.probabilities_by_source["src"].values, w, rtol=1e-4, atol=1e-6)
    expected = np.einsum("btns,bsd->btnd", w, np.asarray(constants["src"].values))
    np.testing.assert_allclose(y.values, expected, rtol=1e-4, atol=1e-5)


def test_errors() -> None:
    x = testing.random_sequence(B, T, D, seed=7)
    with pytest.raises(ValueError, match="num_components"):
        bind(GmmAttention.Config("src", H, U, 0, monotonic=False), x, {"src": x})
    with pytest.raises(ValueError, match="constants\\['src'\\]"):
        bind(GmmAttention.Config("src", H, U, 1, monotonic=False), x, {})
