"""`Device`: the only jax code of the runtime. One model's compiled programs,
its state for every slot, and the calls that start and fetch a tick.

- `state`: the model's state pytree for `max_streams` slots (rounded up to a
  multiple of the device count), the slot axis in place of each leaf's batch
  axis, resident on device and donated to every tick so it updates in place.
- One jit-compiled tick per power-of-two bucket, compiled before the model
  serves: gather the slots' state, `step` one chunk of
  `[bucket, chunk_frames, *c]`, scatter the state back. Slots not in a tick
  are not stepped at all, so their conv buffers and KV windows do not move.
  A full tick (every slot, in slot order) steps the donated state as is.
- New streams' slots are reset to the initial state by a separate program,
  one in-place row write per stream, rather than a select in every tick.
  The same program writes a resumed stream's row from its token, put on
  the device when the token was verified (`put_row`, off the tick thread).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from server.errors import ModelLoadError
from server.model import ServableModel, round_up
from server.programs import LayerProgram, export_in_memory
from server.runtime.config import SchedulerConfig
from server.runtime.scheduler import Staging

log = logging.getLogger("sl-serve")

# XLA's CPU runtime reads a host array in place only if it is aligned to
# 64 bytes; numpy aligns large arrays to 16 or 32, which costs a copy of
# every tick's input on a runtime thread that competes with the step.
_XLA_ALIGN = 64


class Device:
    """One model's programs and slot state on its device(s).

    `build()` then `compile()` then `warm_up()`; after that the tick thread
    alone calls `reset_slots`, `write_rows`, `read_row`, `dispatch`,
    `fetch`, `staging`, `recycle`.
    """

    def __init__(self, model: ServableModel, config: SchedulerConfig, chunk_frames: int) -> None:
        self.model = model
        self.config = config
        self.chunk_frames = chunk_frames
        self.buckets = config.tick_buckets()
        self.compile_seconds: dict[Any, float] = {}
        self.sharded = False
        self.rows = config.max_streams
        self.padding_slot = self.rows
        self.state: list[jax.Array] = []
        self.row_layout: list[tuple[tuple[int, ...], np.dtype[Any]]] = []
        self._free_staging: dict[int, list[Staging]] = {}

    # Start-up ----------------------------------------------------------------------

    def build(self) -> None:
        """Chooses the devices, traces the program once, allocates the state."""
        devices = jax.local_devices()
        if self.config.device:
            devices = [parse_device(self.config.device)]
            self.model.variables = jax.device_put(self.model.variables, devices[0])
        n_dev = len(devices) if self.config.shard else 1
        self.sharded = n_dev > 1
        program = self.model.program
        if isinstance(program, LayerProgram):
            # Trace the layer code once, with a symbolic batch size, instead
            # of once per bucket: each bucket then traces only a call of the
            # exported step. demo-asr: 1.7 s once + 0.1 s a bucket instead of
            # 1.1 s a bucket. Exported at the whole chunk, so the ticks are
            # the ones per-bucket tracing gives (exported at one block and
            # called per block, a 4-block demo-asr tick took 1.85x as long).
            try:
                program = export_in_memory(
                    program.layer,
                    self.model.variables,
                    program.input_spec,
                    frames=self.chunk_frames,
                )
            except ModelLoadError as e:  # a layer that needs a concrete batch size
                log.info("model %s: tracing per bucket (%s)", self.model.name, e)
        self.program = program
        init = lambda b: program.initial_state(self.model.variables, b)
        one, two = jax.eval_shape(lambda: init(1)), jax.eval_shape(lambda: init(2))
        self._batch_axes = jax.tree.map(_batch_axis, one, two)
        # Rows divisible by the device count. Buckets are padded with an
        # out-of-range slot id: its gather fills zeros and its scatter is
        # dropped, so no scratch row is needed and a full tick (every slot)
        # steps the donated state as is, without copying rows out and back.
        self.rows = round_up(self.config.max_streams, n_dev)
        self.padding_slot = self.rows
        self._init_one = jax.tree.map(jnp.asarray, init(1))
        sharding: Any = None
        # Where one stream's row goes before it is written into its slot.
        self._row_sharding: Any = None
        if n_dev == 1 and self.config.device:
            single = jax.sharding.SingleDeviceSharding(devices[0])
            sharding = jax.tree.map(lambda _: single, self._batch_axes)
            self._row_sharding = single
        if n_dev > 1:
            mesh = Mesh(np.array(devices[:n_dev]), ("slots",))
            sharding = jax.tree.map(
                lambda ax: NamedSharding(mesh, PartitionSpec(*([None] * ax), "slots")),
                self._batch_axes,
            )
            self._row_sharding = NamedSharding(mesh, PartitionSpec())
        # The state and the variables cross every device call as flat lists
        # of leaves: flattening their nested dicts on each call cost a
        # quarter of the call's host time.
        self._state_def = jax.tree.structure(one)
        self._state_sharding = None if sharding is None else jax.tree.leaves(sharding)
        self._var_def = jax.tree.structure(self.model.variables)
        rows = self.rows
        self._make_state = jax.jit(
            lambda: jax.tree.leaves(
                jax.tree.map(
                    lambda a, ax: jnp.repeat(a, rows, axis=ax), self._init_one, self._batch_axes
                )
            ),
            out_shardings=self._state_sharding,
        )
        # Leaves of the state pytree, in `self._state_def` order.
        self.state = self._make_state()
        # One stream's row of each leaf (slot axis removed): what a resume
        # token carries, and the layout a token's state must have.
        self._axes = jax.tree.leaves(self._batch_axes)
        self.row_layout = [
            (tuple(d for i, d in enumerate(leaf.shape) if i != ax), np.dtype(leaf.dtype))
            for leaf, ax in zip(jax.tree.leaves(one), self._axes, strict=True)
        ]

    def _tick_fns(self) -> dict[str, Callable[..., Any]]:
        """The device programs on flat leaves, all pure functions of the state
        so jit can donate it and update in place:

        - `gather` (state, slot ids) -> those slots' rows; `rows` (variables,
          rows, x, lengths) -> (new rows, y, y mask), the bare step on a
          bucket's rows; `scatter` (state, slot ids, rows) -> state. A partial
          tick is the three, one after another.
        - `partial`: the same three as one program, for sharded slots.
        - `full` (variables, state, x, lengths): every slot, in slot order.
        - `write` (state, slot, row): one stream's row (leaves without the
          slot axis) into its slot: a new stream's initial row, or a
          resumed stream's.

        Why a partial tick is three programs: compiled as one, XLA:CPU lays
        out the gathered rows to suit the step's dots and then copies the
        KV caches around the in-place writes; a demo-asr tick of 64 rows took
        50 ms against the bare step's 29. Split, the step's rows are a
        parameter in the default layout, as in the bare step (29.6 ms), and
        the gather and scatter are plain copies of the rows (a few ms).
        """
        program, axes = self.program, self._batch_axes
        n, rows = self.config.max_streams, self.rows
        frame_index = jnp.arange(self.chunk_frames, dtype=jnp.int32)

        def step(variables, state, x, lengths):  # type: ignore[no-untyped-def]
            # A row's valid frames are always a prefix of the chunk (the
            # client's frames, then the invalid tail), so the mask is built
            # here from per-row lengths instead of sent with every tick.
            mask = frame_index[None, :] < lengths[:, None]
            # Streams zero every invalid frame (chunk tails, flush, padding
            # rows): the program steps x as a MaskedSequence.
            return program.step(variables, state, x, mask)

        def gather(state, slot_ids):  # type: ignore[no-untyped-def]
            # Padding ids are out of range: their rows are zeros.
            return jax.tree.map(
                lambda a, ax: jnp.take(a, slot_ids, axis=ax, mode="fill", fill_value=0),
                state,
                axes,
            )

        def scatter(state, slot_ids, new):  # type: ignore[no-untyped-def]
            # Padding rows are dropped. Rows not in the tick were not stepped
            # at all (their buffers must not move).
            return jax.tree.map(
                lambda a, r, ax: a.at[(slice(None),) * ax + (slot_ids,)].set(r, mode="drop"),
                state,
                new,
                axes,
            )

        def partial_tick(variables, state, slot_ids, x, lengths):  # type: ignore[no-untyped-def]
            new, y, y_mask = step(variables, gather(state, slot_ids), x, lengths)
            return scatter(state, slot_ids, new), y, y_mask

        def full_tick(variables, state, x, lengths):  # type: ignore[no-untyped-def]
            # Every slot, in slot order (full occupancy): no gather or scatter.
            # With rows == max_streams (one device, or a multiple of the
            # device count) this is the bare step on the donated state.
            if rows == n:
                return step(variables, state, x, lengths)
            head = jax.tree.map(lambda a, ax: jax.lax.slice_in_dim(a, 0, n, axis=ax), state, axes)
            new, y, y_mask = step(variables, head, x, lengths)
            state = jax.tree.map(
                lambda a, r, ax: jax.lax.dynamic_update_slice_in_dim(a, r, 0, axis=ax),
                state,
                new,
                axes,
            )
            return state, y, y_mask

        def write_slot(state_leaves, slot, row_leaves):  # type: ignore[no-untyped-def]
            return [
                jax.lax.dynamic_update_slice_in_dim(a, jnp.expand_dims(r, ax), slot, axis=ax)
                for a, r, ax in zip(state_leaves, row_leaves, self._axes, strict=True)
            ]

        var_def, state_def = self._var_def, self._state_def
        self._read_row = lambda leaves, slot: [
            jnp.squeeze(jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=ax), axis=ax)
            for a, ax in zip(leaves, self._axes, strict=True)
        ]

        def on_leaves(tick: Callable[..., Any]) -> Callable[..., Any]:
            # (variables, state, ...) -> (variable leaves, state leaves, ...)
            def wrapped(var_leaves, state_leaves, *inputs):  # type: ignore[no-untyped-def]
                variables = jax.tree.unflatten(var_def, var_leaves)
                state = jax.tree.unflatten(state_def, state_leaves)
                new, y, y_mask = tick(variables, state, *inputs)
                return jax.tree.leaves(new), y, y_mask

            return wrapped

        def state_fn(fn: Callable[..., Any]) -> Callable[..., Any]:
            # (state leaves, ...) -> leaves of fn(state, ...)
            return lambda leaves, *inputs: jax.tree.leaves(
                fn(jax.tree.unflatten(state_def, leaves), *inputs)
            )

        def scatter_leaves(state_leaves, slot_ids, row_leaves):  # type: ignore[no-untyped-def]
            unflatten = lambda leaves: jax.tree.unflatten(state_def, leaves)
            return jax.tree.leaves(
                scatter(unflatten(state_leaves), slot_ids, unflatten(row_leaves))
            )

        return {
            "gather": state_fn(gather),
            "rows": on_leaves(step),
            "scatter": scatter_leaves,
            "partial": on_leaves(partial_tick),
            "full": on_leaves(full_tick),
            "write": write_slot,
        }

    def compile(self, stopping: Callable[[], bool] = lambda: False) -> bool:
        """Lowers every program (Python, holds the GIL: cheap since the step
        is traced once), then compiles them two at a time: XLA compiles, and
        reads compiled programs back from the persistent cache, without the
        GIL. A warm start of demo-asr spent most of its time there, one
        program after another. False if `stopping()` cut it short."""
        spec = self.model.input_spec
        out = (self._state_sharding, None, None) if self._state_sharding else None
        fns = self._tick_fns()
        self._var_leaves = jax.tree.leaves(self.model.variables)
        x_spec = lambda b: jax.ShapeDtypeStruct((b, self.chunk_frames, *spec.shape), spec.dtype)
        ids_spec = lambda b: jax.ShapeDtypeStruct((b,), jnp.int32)
        n = self.config.max_streams
        # One device: a partial tick is gather, the bare step on the rows,
        # scatter (see `_tick_fns`). Sharded slots keep one program: its
        # rows would need a sharding of their own.
        split = not self.sharded
        partial = jax.jit(fns["partial"], donate_argnums=(1,), out_shardings=out)
        gather = jax.jit(fns["gather"])
        rows_step = jax.jit(fns["rows"], donate_argnums=(1,))
        scatter = jax.jit(fns["scatter"], donate_argnums=(0,), out_shardings=self._state_sharding)
        full = jax.jit(fns["full"], donate_argnums=(1,), out_shardings=out)
        write = jax.jit(fns["write"], donate_argnums=(0,), out_shardings=self._state_sharding)

        def rows_spec(b: int) -> list[jax.ShapeDtypeStruct]:
            return [
                jax.ShapeDtypeStruct((*a.shape[:ax], b, *a.shape[ax + 1 :]), a.dtype)
                for a, ax in zip(self.state, self._axes, strict=True)
            ]

        lowered: dict[Any, tuple[Any, float]] = {}

        def lower(key: Any, fn: Any, *args: Any) -> None:
            start = time.perf_counter()
            lowered[key] = (fn.lower(*args), time.perf_counter() - start)

        for bucket in self.buckets:
            if split:
                lower((bucket, "gather"), gather, self.state, ids_spec(bucket))
                lower(
                    (bucket, "rows"),
                    rows_step,
                    self._var_leaves,
                    rows_spec(bucket),
                    x_spec(bucket),
                    ids_spec(bucket),
                )
            else:
                lower(
                    (bucket, "partial"),
                    partial,
                    self._var_leaves,
                    self.state,
                    ids_spec(bucket),
                    x_spec(bucket),
                    ids_spec(bucket),
                )
            # The partial tick's last program on one device; resumed streams'
            # rows (`write_rows`) go in through it either way.
            lower((bucket, "scatter"), scatter, self.state, ids_spec(bucket), rows_spec(bucket))
        # With one row per slot the full tick is the step on every row: the
        # bucket of max_streams rows already is that program.
        full_is_rows = split and self.rows == n and n in self.buckets
        if not full_is_rows:
            lower("full", full, self._var_leaves, self.state, x_spec(n), ids_spec(n))
        slot_spec = jax.ShapeDtypeStruct((), jnp.int32)
        row_spec = [
            jax.ShapeDtypeStruct(shape, dtype, sharding=self._row_sharding)
            for shape, dtype in self.row_layout
        ]
        lower("write", write, self.state, slot_spec, row_spec)
        # Stream migration: one slot's row to the host (hand-off). Compiled
        # with the rest so the first moving stream pays no compile.
        lower("read_row", jax.jit(self._read_row), self.state, slot_spec)

        seconds: dict[Any, float] = {}

        def compile_one(key: Any) -> Any:
            if stopping():  # a signal during start-up: stop compiling
                return None
            start = time.perf_counter()
            program, lower_seconds = lowered[key]
            compiled = program.compile()
            seconds[key] = lower_seconds + time.perf_counter() - start
            return compiled

        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="xla-compile") as pool:
            compiled = dict(zip(lowered, pool.map(compile_one, lowered), strict=True))
        if stopping():
            return False
        if split:
            self._split = {b: (compiled[b, "gather"], compiled[b, "rows"]) for b in self.buckets}
        else:
            self._compiled = {b: compiled[b, "partial"] for b in self.buckets}
        self._scatter = {b: compiled[b, "scatter"] for b in self.buckets}
        self._full = compiled[n, "rows"] if full_is_rows else compiled["full"]
        self._write = compiled["write"]
        self._initial = list(self.put_row(self.initial_row()))
        self._read = compiled["read_row"]
        # The metric has one figure per bucket (its programs together) and
        # one "full" for the full tick and the slot programs.
        for key, value in seconds.items():
            bucket = key[0] if isinstance(key, tuple) else "full"
            self.compile_seconds[bucket] = self.compile_seconds.get(bucket, 0.0) + value
        return True

    def warm_up(self) -> dict[int, float]:
        """Runs every compiled program three times; returns the faster of the
        last two runs' seconds per bucket (the scheduler's first tick-time estimates).
        First executions allocate the runtime's buffers and took up to
        100 ms, which the first streams after start-up paid as latency.

        Every program runs once before any is timed. Timed right after its
        own first run, a bucket's ticks could still be taking fresh memory
        from the kernel: demo-asr's 64-row tick took ~8,000 page faults a
        run and 30-36 ms instead of 21 (2-core EPYC: in 8 start-ups of 9;
        in none of 5 once every program had run). Seeded that slow, the
        bucket was never chosen while the one below it ran (its estimate
        scales from its seed), and admission, which predicts from the best
        bucket's rate, refused streams the device had room for.

        The state changes: these ticks step real rows. That is harmless
        because no stream is active yet and every new stream resets its
        slot (or has its row written) before its first step.
        """
        spec = self.model.input_spec
        slots_n = self.config.max_streams
        full = np.arange(slots_n, dtype=np.int32)
        # Distinct rows, spread over the table, as a loaded tick has: the
        # padding slot alone kept one row in cache and timed only the
        # compute. demo-asr (495 KB rows) on a 2-core EPYC: 128 rows took
        # 2.0x the time of 64 on one row, 2.5x on distinct rows, so ticks
        # of 128 were chosen over 64 and ran at 2 rows/ms instead of 3.2.
        partial = []
        for b in self.buckets:
            k = min(b, slots_n)
            ids = np.full((b,), self.padding_slot, np.int32)
            ids[:k] = np.linspace(0, slots_n - 1, k).astype(np.int32)
            partial.append(ids)
        ticks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for slots in [*partial, full]:
            b = slots.shape[0]
            x = np.zeros((b, self.chunk_frames, *spec.shape), spec.dtype)
            lengths = np.zeros((b,), np.int32)
            ticks.append((slots, x, lengths))
            self.run_tick(slots, x, lengths)
        seconds: dict[int, float] = {}
        for slots, x, lengths in ticks:
            b = slots.shape[0]
            # The faster of two timed runs: these are the estimates of
            # buckets not run lately, scaled by how the nearest running one
            # has slowed (`policy.TickTimes`), and rank the buckets a loaded
            # tick fills; one run was off by 20-40% often enough to rank
            # them wrongly.
            times = []
            for _ in range(2):
                start = time.perf_counter()
                self.run_tick(slots, x, lengths)
                times.append(time.perf_counter() - start)
            seconds[b] = min(times)
        self.reset_slots([0])
        jax.block_until_ready(self.state)
        return seconds

    # Ticks (tick thread) -------------------------------------------------------------

    def staging(self, bucket: int) -> Staging:
        """Host arrays for one tick's inputs: reused once `recycle`d, because
        until the device call has finished the runtime may still read them
        (in place, on CPU)."""
        free = self._free_staging.setdefault(bucket, [])
        if free:
            return free.pop()
        spec = self.model.input_spec
        return Staging(
            x=aligned_zeros((bucket, self.chunk_frames, *spec.shape), spec.dtype),
            slots=np.full((bucket,), self.padding_slot, np.int32),
            taken=np.zeros((bucket,), np.int32),
            padding_slot=self.padding_slot,
        )

    def recycle(self, staged: Staging) -> None:
        """A delivered tick's inputs may be overwritten. Not so with slots
        sharded over several devices: each device runs its own program and
        may still read its (aliased, on CPU) slice of the inputs after the
        outputs are complete; reusing the buffers corrupted 1 run in 8 of
        tests/server/sharded_check.py. Those ticks stage into fresh buffers."""
        if not self.sharded:
            self._free_staging.setdefault(staged.x.shape[0], []).append(staged)

    def put_row(self, row: tuple[Any, ...]) -> tuple[jax.Array, ...]:
        """One stream's state row (host leaves) on the device, ready for
        `write_rows`. Any thread may call it: the doors do, for a resumed
        stream's row, on the thread that verified its token.

        Why not on the tick thread: copying rows there (numpy into a
        bucket's stacked arrays, or jax's transfer of host leaves) gives up
        and takes back the GIL for every leaf; with a door's event loop
        busy, each take waits out the switch interval. 8 demo-asr rows
        (36 leaves each) took 1.2 ms alone and 240 ms next to a busy
        Python thread, and 15-37 ms in the ticks of a migration burst,
        while the streams running there waited."""
        return tuple(jax.device_put(list(row), self._row_sharding))

    def reset_slots(self, slots: list[int]) -> None:
        """Puts new streams' slots back to the initial state."""
        for slot in slots:
            self.state = self._write(self.state, np.int32(slot), self._initial)

    def write_rows(self, rows: list[tuple[int, tuple[Any, ...]]]) -> None:
        """Puts resumed streams' state rows into their slots, in place of
        the reset a new stream gets: one device call a row, on rows
        `put_row` put on the device already (host rows work too, with their
        transfer on this thread). How many rows a tick writes is the
        scheduler's (`restore_bytes_per_tick`)."""
        for slot, row in rows:
            self.state = self._write(self.state, np.int32(slot), list(row))

    def read_row(self, slot: int) -> tuple[np.ndarray, ...]:
        """One slot's state row on the host (a moving stream's, for its
        token); waits for the ticks dispatched before it."""
        return tuple(np.asarray(leaf) for leaf in self._read(self.state, np.int32(slot)))

    def initial_row(self) -> tuple[np.ndarray, ...]:
        """A new stream's state row (a stream that moves before its first step)."""
        return tuple(
            np.squeeze(np.asarray(leaf), axis=ax)
            for leaf, ax in zip(jax.tree.leaves(self._init_one), self._axes, strict=True)
        )

    def dispatch(self, slot_ids: np.ndarray, x: np.ndarray, lengths: np.ndarray) -> Any:
        """Starts one device call and returns its (not yet ready) outputs.
        `slot_ids` are sorted and padded to a bucket with an out-of-range
        slot. The new state is chained on the device, so a later tick may be
        dispatched before this one's outputs are fetched.

        The caller may overwrite `slot_ids` as soon as this returns, `x` and
        `lengths` once `fetch` has returned: XLA:CPU reads aligned host
        arrays in place, and the scatter, which reads the ids, may run after
        the outputs are ready. It gets a copy of its own, which nothing
        writes (reading the caller's restaged ids, a late scatter once
        wrote stepped rows into the next tick's slots)."""
        n = self.config.max_streams
        if len(slot_ids) == n and slot_ids[0] == 0 and slot_ids[-1] == n - 1:
            self.state, y, y_mask = self._full(self._var_leaves, self.state, x, lengths)
        elif self.sharded:
            compiled = self._compiled[slot_ids.shape[0]]
            self.state, y, y_mask = compiled(self._var_leaves, self.state, slot_ids, x, lengths)
        else:
            bucket = slot_ids.shape[0]
            slot_ids = slot_ids.copy()
            gather, step = self._split[bucket]
            rows, y, y_mask = step(self._var_leaves, gather(self.state, slot_ids), x, lengths)
            self.state = self._scatter[bucket](self.state, slot_ids, rows)
        return y, y_mask

    def fetch(self, outputs: Any) -> tuple[np.ndarray, np.ndarray]:
        """Waits for a dispatched tick; its outputs on the host."""
        y, y_mask = outputs
        return np.asarray(y), np.asarray(y_mask)

    def done(self, outputs: Any) -> bool:
        """Whether a dispatched tick's outputs are ready (never waits)."""
        return bool(outputs[0].is_ready())

    def run_tick(
        self, slot_ids: np.ndarray, x: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """One device call, waited for; returns host outputs. For benchmarks."""
        return self.fetch(self.dispatch(slot_ids, x, lengths))

    def state_lost(self) -> bool:
        """After a failed call: whether the donated state went with it."""
        return any(leaf.is_deleted() for leaf in self.state)

    def reset_state(self) -> None:
        """Every slot back to the initial state (after the state was lost)."""
        self.state = self._make_state()


def parse_device(spec: str) -> jax.Device:
    """`"cpu:0"`, `"gpu:1"` (or `"cuda:1"`) -> a local device."""
    platform, _, index = spec.partition(":")
    platform = {"cuda": "gpu"}.get(platform, platform)
    try:
        devices = jax.local_devices(backend=platform)
        return devices[int(index or 0)]
    except (RuntimeError, ValueError, IndexError) as e:
        raise ValueError(
            f"device {spec!r} is not available here; local devices: {jax.local_devices()}."
        ) from e


def aligned_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """`np.zeros`, with the data aligned so the CPU runtime need not copy it."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(nbytes + _XLA_ALIGN, np.uint8)
    start = -raw.ctypes.data % _XLA_ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _batch_axis(one: jax.ShapeDtypeStruct, two: jax.ShapeDtypeStruct) -> int:
    for axis, (a, b) in enumerate(itertools.zip_longest(one.shape, two.shape)):
        if a != b:
            return axis
    raise ValueError(
        f"a state leaf of shape {one.shape} does not grow with batch size; the model's state "
        f"is not batch-major, so streams cannot share a tick."
    )
