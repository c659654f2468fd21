"""Shared helpers for the simple-layer tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sequence_layers import Sequence, testing
from sequence_layers.types import SequenceLayer, SequenceLayerConfig

VerifyFn = Callable[..., tuple[SequenceLayer, Sequence]]


def run_contract(
    config: SequenceLayerConfig, x: Sequence, *, rf: bool = False, **kwargs: Any
) -> tuple[SequenceLayer, Sequence]:
    """Inits + binds `config` on `x` and runs the full contract check.

    The receptive-field check (a jacrev per layer, seconds each) is enabled
    only where a layer declares something other than the inherited (0, 0).
    """
    layer = testing.init_and_bind(config, x)
    kwargs.setdefault("grad_rtol", 1e-5)
    kwargs.setdefault("grad_atol", 1e-5)
    y = testing.verify_contract(layer, x, test_receptive_field=rf, **kwargs)
    return layer, y


@pytest.fixture
def verify() -> VerifyFn:
    return run_contract
