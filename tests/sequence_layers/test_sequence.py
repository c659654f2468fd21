"""Tests of `Sequence` and `MaskedSequence`: construction, type rules, slicing,
padding and masking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers.sequence import ChannelSpec, MaskedSequence, Sequence


def seq(values: list, mask: list, cls: type[Sequence] = Sequence) -> Sequence:
    return cls(jnp.asarray(values, jnp.float32), jnp.asarray(mask, bool))


@pytest.fixture
def x() -> Sequence:
    # [2, 3, 1]; row 1 has an invalid, non-zero last frame.
    return seq([[[1.0], [2.0], [3.0]], [[4.0], [5.0], [6.0]]], [[1, 1, 1], [1, 1, 0]])


def test_validation() -> None:
    with pytest.raises(ValueError, match="mask must be bool"):
        Sequence(jnp.zeros((1, 2)), jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="rank"):
        Sequence(jnp.zeros((2,)), jnp.zeros((2,), bool))
    with pytest.raises(ValueError, match="disagree"):
        Sequence(jnp.zeros((1, 3, 2)), jnp.zeros((1, 2), bool))
    # Rank-2 values (no channel dims) are fine.
    assert Sequence(jnp.zeros((1, 2)), jnp.ones((1, 2), bool)).channel_shape == ()


def test_shape_and_type(x: Sequence) -> None:
    assert x.shape == (2, 3, 1) and x.ndim == 3 and x.channel_shape == (1,)
    assert x.dtype == jnp.float32
    assert x.channel_spec == ChannelSpec((1,), jnp.float32)
    assert x.lengths().tolist() == [3, 2]
    assert x.expanded_mask().shape == (2, 3, 1)
    y = x.astype(jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and type(y) is Sequence
    masked = x.mask_invalid().astype(jnp.int32)
    assert type(masked) is MaskedSequence


def test_is_a_pytree_with_its_class_in_the_treedef(x: Sequence) -> None:
    doubled = jax.tree.map(lambda a: a if a.dtype == bool else a * 2, x.mask_invalid())
    assert type(doubled) is MaskedSequence
    # The class is part of the treedef (treedef == does not look at it, str does).
    assert str(jax.tree.structure(x)) != str(jax.tree.structure(x.mask_invalid()))
    out = jax.jit(lambda s: s.mask_invalid())(x)
    np.testing.assert_array_equal(out.values[1, 2], [0.0])


def test_from_values_and_from_lengths() -> None:
    values = jnp.arange(6.0).reshape(2, 3)
    full = Sequence.from_values(values)
    assert type(full) is MaskedSequence and bool(full.mask.all())
    x = Sequence.from_lengths(values, [1, 3])
    assert type(x) is Sequence
    np.testing.assert_array_equal(x.mask, [[True, False, False], [True, True, True]])
    assert type(Sequence.from_lengths(values, [0, 2], is_masked=True)) is MaskedSequence
    assert Sequence.from_lengths(values, [0, 0]).lengths().tolist() == [0, 0]


def test_concatenation_is_masked_only_if_all_inputs_are(x: Sequence) -> None:
    m = x.mask_invalid()
    assert type(m.concatenate(m)) is MaskedSequence
    assert type(m.concatenate(x)) is Sequence
    assert type(x.concatenate(m)) is Sequence
    both = Sequence.concatenate_sequences([m, m, m])
    assert both.shape == (2, 9, 1) and type(both) is MaskedSequence
    np.testing.assert_array_equal(both.mask[1], [1, 1, 0] * 3)
    with pytest.raises(ValueError, match="at least one"):
        Sequence.concatenate_sequences([])


def test_apply_rules(x: Sequence) -> None:
    m = x.mask_invalid()
    assert type(m.apply_values(lambda v: v + 1)) is Sequence
    kept = m.apply_values_masked(lambda v, k: v * k, 3)
    assert type(kept) is MaskedSequence
    np.testing.assert_array_equal(kept.values[:, :, 0], [[3, 6, 9], [12, 15, 0]])
    flipped = m.apply(lambda v, mask: (-v, ~mask))
    assert type(flipped) is Sequence and not bool(flipped.mask[0, 0])
    assert type(m.apply_masked(lambda v, mask: (v, mask))) is MaskedSequence
    assert type(x.apply_values_masked(lambda v: v)) is Sequence


def test_slicing_refuses_integer_indexing(x: Sequence) -> None:
    y = x[:, 1:]
    assert y.shape == (2, 2, 1) and type(y) is Sequence
    np.testing.assert_array_equal(y.mask, [[1, 1], [1, 0]])
    assert x.mask_invalid()[1:, ::2].shape == (1, 2, 1)
    assert type(x.mask_invalid()[:1]) is MaskedSequence
    for key in [0, (slice(None), 1), (slice(None), slice(None), 0), (0, slice(None))]:
        with pytest.raises(ValueError, match="slicing batch and time only"):
            x[key]


def test_pad_time(x: Sequence) -> None:
    m = x.mask_invalid()
    y = m.pad_time(1, 2, valid=False)
    assert y.shape == (2, 6, 1) and type(y) is MaskedSequence
    np.testing.assert_array_equal(y.mask[0], [0, 1, 1, 1, 0, 0])
    # Valid padding keeps the masked guarantee (the padded frames are valid).
    assert type(m.pad_time(0, 1, valid=True, pad_value=7.0)) is MaskedSequence
    np.testing.assert_array_equal(m.pad_time(0, 1, valid=True).mask[:, -1], [True, True])
    # Invalid frames padded with zero keep it; non-zero demotes.
    assert type(m.pad_time(0, 1, valid=False, pad_value=0.0)) is MaskedSequence
    nan_padded = m.pad_time(0, 1, valid=False, pad_value=jnp.nan)
    assert type(nan_padded) is Sequence and bool(jnp.isnan(nan_padded.values[0, -1, 0]))
    assert type(x.pad_time(0, 1, valid=False)) is Sequence
    assert m.pad_time(0, 0, valid=False) is m
    with pytest.raises(ValueError, match="non-negative"):
        x.pad_time(-1, 0, valid=False)


def test_pad_to_multiple_and_reverse(x: Sequence) -> None:
    assert x.pad_to_multiple(3) is x
    y = x.pad_to_multiple(4)
    assert y.shape[1] == 4 and not bool(y.mask[:, 3].any())
    r = x.reverse_time()
    np.testing.assert_array_equal(r.values[0, :, 0], [3, 2, 1])
    np.testing.assert_array_equal(r.mask[1], [0, 1, 1])
    assert type(x.mask_invalid().reverse_time()) is MaskedSequence


def test_mask_invalid(x: Sequence) -> None:
    m = x.mask_invalid()
    assert type(m) is MaskedSequence
    np.testing.assert_array_equal(m.values[:, :, 0], [[1, 2, 3], [4, 5, 0]])
    assert m.mask_invalid() is m  # already masked: no work
    filled = m.mask_invalid(-1.0)
    assert type(filled) is Sequence
    np.testing.assert_array_equal(filled.values[1, :, 0], [4, 5, -1])
    assert type(m.unmask()) is Sequence
    np.testing.assert_array_equal(m.unmask().values, m.values)


def test_nan_invalid_frames_never_survive_mask_invalid() -> None:
    x = Sequence(jnp.array([[[1.0], [jnp.nan]]]), jnp.array([[True, False]]))
    np.testing.assert_array_equal(x.mask_invalid().values[0, :, 0], [1.0, 0.0])


def test_repr(x: Sequence) -> None:
    assert repr(x.mask_invalid()).startswith("MaskedSequence(values=")
