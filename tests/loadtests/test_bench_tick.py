"""bench_tick's masked page step: what it times must be a correct tick."""

from __future__ import annotations

import jax
import numpy as np

import sequence_layers as sl
from loadtests.bench_tick import masked_step
from server.model import ServableModel, init_variables
from server.runtime import SchedulerConfig
from server.runtime.device import Device


def test_masked_page_step_steps_ready_rows_and_keeps_the_others() -> None:
    config = sl.Serial.Config(
        (sl.Conv1D.Config(filters=3, kernel_size=3, padding="causal"), sl.Dense.Config(2))
    )
    model = ServableModel("conv", config, init_variables(config, (4,), seed=0), (4,))
    rows = 4
    device = Device(model, SchedulerConfig(max_streams=rows, buckets=(rows,)), chunk_frames=2)
    device.build()
    rows_step = device._tick_fns()["rows"]
    variables = jax.tree.leaves(model.variables)
    rng = np.random.default_rng(0)
    # A first step with every row ready, so that the state is not all zeros.
    x0 = rng.normal(size=(rows, 2, 4)).astype(np.float32)
    lengths = np.full(rows, 2, np.int32)
    state, _, _ = rows_step(variables, device.state, x0, lengths)
    # Copies: the masked step donates (and may overwrite) these buffers.
    before = [np.array(leaf, copy=True) for leaf in state]

    x = rng.normal(size=(rows, 2, 4)).astype(np.float32)
    want_state, want_y, want_mask = rows_step(variables, state, x, lengths)
    ready = np.array([True, False, True, False])
    masked = masked_step(rows_step, device._axes)
    got_state, got_y, got_mask = masked(variables, state, x, lengths, ready)

    np.testing.assert_allclose(np.asarray(got_y), np.asarray(want_y), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got_mask), np.asarray(want_mask))
    for got, want, old, ax in zip(got_state, want_state, before, device._axes, strict=True):
        got, want = np.moveaxis(np.asarray(got), ax, 0), np.moveaxis(np.asarray(want), ax, 0)
        old = np.moveaxis(old, ax, 0)
        np.testing.assert_allclose(got[ready], want[ready], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got[~ready], old[~ready])
