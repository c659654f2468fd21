"""Stream migration in process: two `Runtime`s with the same model and keys
stand for two replicas. A stream moved off the first (its state row read
from the device, signed) and resumed on the second (the row written into a
free slot) gives exactly what one uninterrupted stream gives (== offline);
refused tokens restore nothing and leave the server serving."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import pytest

import sequence_layers as sl
from sequence_layers import testing
from server import resume
from server.defaults import BUILTIN_MODELS
from server.errors import Unavailable
from server.model import ServableModel, init_variables
from server.resume import ResumeKeys, ResumeTokenError
from server.runtime import (
    Ended,
    Engine,
    Moved,
    Output,
    Runtime,
    SchedulerConfig,
    StreamHandle,
)
from server.segments import SegmentOptions, SpeechEvent, SpeechSegmenter
from tests.server.vad_audio import speech_mix, wheel_or_skip

KEYS = ResumeKeys((b"a" * 40,))
FOREIGN = ResumeKeys((b"b" * 40,))
SCHED = SchedulerConfig(max_streams=4, buckets=(4,), max_batch_delay_ms=1.0)


def _asr_like() -> ServableModel:
    """Input latency (reverse-causal conv), a strided conv and a KV cache."""
    config = sl.Serial.Config(
        (
            sl.Conv1D.Config(filters=4, kernel_size=3, padding="reverse_causal"),
            sl.Conv1D.Config(filters=4, kernel_size=3, strides=2, padding="causal"),
            sl.DotProductSelfAttention.Config(num_heads=2, units_per_head=2, max_past_horizon=5),
            sl.Flatten.Config(),
            sl.LSTM.Config(units=3),
        )
    )
    return ServableModel("asr", config, init_variables(config, (2,), seed=3), (2,))


def _upsampler() -> ServableModel:
    """output_ratio 3: a transposed conv after a causal conv."""
    config = sl.Serial.Config(
        (
            sl.Conv1D.Config(filters=3, kernel_size=3, padding="causal"),
            sl.Conv1DTranspose.Config(filters=2, kernel_size=6, strides=3, padding="causal"),
        )
    )
    return ServableModel("up", config, init_variables(config, (2,), seed=4), (2,))


@pytest.fixture(scope="module")
def replicas() -> Iterator[tuple[Runtime, Runtime]]:
    """Two replicas of the same two models, sharing a key."""
    models = [_asr_like(), _upsampler()]
    first = Runtime({m.name: m for m in models}, SCHED, resume_keys=KEYS)
    second = Runtime({m.name: dataclasses.replace(m) for m in models}, SCHED, resume_keys=KEYS)
    first.start()
    second.start()
    yield first, second
    first.stop()
    second.stop()


async def _collect(handle: StreamHandle, outputs: dict[int, np.ndarray]) -> Ended | Moved:
    async for item in handle.outputs():
        if isinstance(item, Output):
            outputs[item.offset] = item.frames
        elif isinstance(item, Ended | Moved):
            return item
    raise AssertionError("outputs() ended without Ended or Moved")


def _joined(outputs: dict[int, np.ndarray]) -> np.ndarray:
    at = 0
    pieces = []
    for offset in sorted(outputs):
        assert offset == at, f"output offsets {sorted(outputs)}: a gap or an overlap at {at}"
        pieces.append(outputs[offset])
        at += outputs[offset].shape[0]
    return np.concatenate(pieces)


async def _move_and_resume(
    source: Runtime, target: Runtime, model: str, x: np.ndarray, sent: int, ended: bool
) -> tuple[np.ndarray, Moved]:
    """Streams `x[:sent]` (and `end` if `ended`) on `source`, moves it, then
    resumes it on `target` with the rest."""
    outputs: dict[int, np.ndarray] = {}
    handle = source.open_stream(model)
    for start in range(0, sent, 5):
        handle.send(x[start : min(start + 5, sent)])
        await asyncio.sleep(0.002)  # some ticks run before the move
    if ended:
        handle.end()
    source.engines[model].move_streams()
    moved = await _collect(handle, outputs)
    handle.cancel()
    assert isinstance(moved, Moved)
    assert moved.frames_received == sent
    resumed = target.open_stream(model, resume_token=moved.resume_token)
    assert resumed.output_offset == sum(o.shape[0] for o in outputs.values())
    if moved.frames_received < x.shape[0]:
        resumed.send(x[moved.frames_received :])
    resumed.end()
    assert isinstance(await _collect(resumed, outputs), Ended)
    resumed.cancel()
    return _joined(outputs), moved


@pytest.mark.parametrize(
    ("model", "sent", "ended"),
    [("asr", 23, False), ("asr", 40, True), ("asr", 0, False), ("up", 17, False)],
)
def test_moved_stream_resumes_exactly(
    replicas: tuple[Runtime, Runtime], model: str, sent: int, ended: bool
) -> None:
    first, second = replicas
    x = np.random.default_rng(sent).normal(size=(40, 2)).astype(np.float32)

    async def run() -> tuple[np.ndarray, Moved]:
        return await _move_and_resume(first, second, model, x, sent, ended)

    y, moved = asyncio.run(run())
    expected = first.engines[model].model.offline(x)
    testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)
    assert first.active_streams == second.active_streams == 0
    assert len(moved.resume_token) < 64 * 1024


def _token(replicas: tuple[Runtime, Runtime]) -> bytes:
    first, _ = replicas

    async def run() -> bytes:
        handle = first.open_stream("asr")
        handle.send(np.ones((9, 2), np.float32))
        await asyncio.sleep(0.01)
        first.engines["asr"].move_streams()
        moved = await _collect(handle, {})
        handle.cancel()
        assert isinstance(moved, Moved)
        return moved.resume_token

    return asyncio.run(run())


def test_refused_tokens_restore_nothing(replicas: tuple[Runtime, Runtime]) -> None:
    first, second = replicas
    token = _token(replicas)
    tampered = bytearray(token)
    tampered[-40] ^= 1
    snapshot = resume.verify_token(
        token, KEYS, model_name="asr", fingerprint=first.engines["asr"].fingerprint
    )
    foreign = resume.sign_token(
        snapshot, FOREIGN, model_name="asr", fingerprint=first.engines["asr"].fingerprint
    )
    old = resume.sign_token(
        snapshot, KEYS, model_name="asr", fingerprint=first.engines["asr"].fingerprint, now=0
    )
    cases = [
        (bytes(tampered), "asr", "PERMISSION_DENIED"),
        (foreign, "asr", "PERMISSION_DENIED"),
        (token, "up", "FAILED_PRECONDITION"),
        (old, "asr", "DEADLINE_EXCEEDED"),
        (b"nonsense", "asr", "INVALID_ARGUMENT"),
    ]

    async def run() -> None:
        for bad, model, code in cases:
            with pytest.raises(ResumeTokenError) as refused:
                second.open_stream(model, resume_token=bad)
            assert refused.value.code == code, refused.value.message
            assert second.active_streams == 0
        # Still serving: a plain stream, and the good token.
        handle = second.open_stream("asr", resume_token=token)
        handle.send(np.ones((3, 2), np.float32))
        handle.end()
        assert isinstance(await _collect(handle, {}), Ended)
        handle.cancel()

    asyncio.run(run())


def test_a_server_without_keys_refuses_tokens(replicas: tuple[Runtime, Runtime]) -> None:
    token = _token(replicas)
    keyless = Runtime({"up": _upsampler()}, SCHED)
    keyless.engines["up"].scheduler.accepting = True  # no compile: refused before a slot

    async def run() -> None:
        with pytest.raises(ResumeTokenError) as refused:
            keyless.open_stream("up", resume_token=token)
        assert refused.value.code == "FAILED_PRECONDITION"

    asyncio.run(run())
    assert keyless.move_streams() == 0


def test_resume_stream_checks_the_token_off_the_event_loop(
    replicas: tuple[Runtime, Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the doors call: the token is verified and decoded on a worker
    thread while the loop goes on (a verify on the loop would wait for the
    loop here, and time out); the stream then resumes exactly as with
    `open_stream`, and a refused token still restores nothing."""
    _, second = replicas
    token = _token(replicas)
    engine = second.engines["asr"]
    checked_on: list[str] = []
    loop_ran = threading.Event()
    verify = engine.verify

    def verify_after_the_loop_ran(token: bytes) -> resume.StreamSnapshot:
        checked_on.append(threading.current_thread().name)
        assert loop_ran.wait(10), "the event loop was blocked while the token was checked"
        snapshot = verify(token)
        # Its row went to the device here too, not on the tick thread.
        assert all(isinstance(leaf, jax.Array) for leaf in snapshot.state)
        return snapshot

    monkeypatch.setattr(engine, "verify", verify_after_the_loop_ran)

    async def run() -> None:
        resuming = asyncio.create_task(second.resume_stream("asr", token))
        await asyncio.sleep(0.01)
        assert not resuming.done()
        loop_ran.set()  # the loop runs while the token is being checked
        handle = await asyncio.wait_for(resuming, 10)
        handle.send(np.ones((3, 2), np.float32))
        handle.end()
        assert isinstance(await _collect(handle, {}), Ended)
        handle.cancel()
        with pytest.raises(ResumeTokenError) as refused:
            await second.resume_stream("asr", b"nonsense")
        assert refused.value.code == "INVALID_ARGUMENT"

    asyncio.run(run())
    assert [name.startswith("resume-verify") for name in checked_on] == [True, True]
    assert second.active_streams == 0


def test_a_resumed_stream_moves_again_before_its_first_step(
    replicas: tuple[Runtime, Runtime],
) -> None:
    """A stream resumed on B moves on before B ever steps it (its row still
    the token's, on B's device): its next token carries that row, and the
    stream finishes on A exactly as offline."""
    first, second = replicas
    x = np.random.default_rng(5).normal(size=(30, 2)).astype(np.float32)

    async def run() -> tuple[np.ndarray, int]:
        outputs: dict[int, np.ndarray] = {}
        handle = first.open_stream("asr")
        handle.send(x[:9])
        await asyncio.sleep(0.01)
        first.engines["asr"].move_streams()
        moved = await _collect(handle, outputs)
        handle.cancel()
        assert isinstance(moved, Moved)
        resumed = await second.resume_stream("asr", moved.resume_token)
        ticks = second.engines["asr"].scheduler.ticks
        second.engines["asr"].move_streams()
        again = await _collect(resumed, outputs)
        resumed.cancel()
        assert isinstance(again, Moved) and again.frames_received == 9
        stepped_on_b = second.engines["asr"].scheduler.ticks - ticks
        last = first.open_stream("asr", resume_token=again.resume_token)
        last.send(x[9:])
        last.end()
        assert isinstance(await _collect(last, outputs), Ended)
        last.cancel()
        return _joined(outputs), stepped_on_b

    y, stepped_on_b = asyncio.run(run())
    assert stepped_on_b == 0
    testing.assert_allclose(y, first.engines["asr"].model.offline(x), atol=1e-5, rtol=1e-5)


def test_a_token_too_large_ends_the_stream_as_without_keys(
    replicas: tuple[Runtime, Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = replicas
    engine = first.engines["asr"]

    def too_large(snapshot: resume.StreamSnapshot) -> bytes:
        raise resume.TokenTooLarge("the stream's token would be 20 MB; the limit is 16 MiB.")

    monkeypatch.setattr(engine, "sign", too_large)

    async def run() -> None:
        handle = first.open_stream("asr")
        handle.send(np.ones((9, 2), np.float32))
        engine.move_streams()
        with pytest.raises(Unavailable, match="cannot hand this stream off"):
            await _collect(handle, {})
        handle.cancel()

    asyncio.run(run())
    assert first.active_streams == 0


def test_speech_segmenter_state_travels() -> None:
    probs = [0.1, 0.9, 0.9, 0.2, 0.1, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1]
    whole = SpeechSegmenter(SegmentOptions(min_silence_duration_ms=1), 512, 16000)
    expected = whole.push(probs)
    before = SpeechSegmenter(SegmentOptions(min_silence_duration_ms=1), 512, 16000)
    events = before.push(probs[:4])
    after = SpeechSegmenter(SegmentOptions(min_silence_duration_ms=1), 512, 16000)
    after.restore(json.loads(json.dumps(before.state())))  # as a token carries it
    assert events + after.push(probs[4:]) == expected
    assert any(e.kind == "speech_stopped" for e in expected)


def test_silero_vad_moves_with_its_speech_segments() -> None:
    """The segmenter's state travels in the token: events across the move
    are those of one uninterrupted stream (the official rule over offline
    probabilities), and the probabilities equal offline."""
    wheel_or_skip()
    model = BUILTIN_MODELS["silero-vad"]()
    engine = Engine(model, SchedulerConfig(max_streams=2, buckets=(2,), max_batch_delay_ms=1))
    engine.resume_keys = KEYS
    engine.start()
    x = speech_mix(5)[:, None]
    options = SegmentOptions()
    cut = len(x) // 2
    try:

        async def run() -> tuple[dict[int, np.ndarray], list[SpeechEvent]]:
            loop = asyncio.get_running_loop()
            outputs: dict[int, np.ndarray] = {}
            events: list[SpeechEvent] = []

            async def read(handle: StreamHandle) -> object:
                async for item in handle.outputs():
                    if isinstance(item, Output):
                        outputs[item.offset] = item.frames
                    elif isinstance(item, SpeechEvent):
                        events.append(item)
                    else:
                        handle.cancel()
                        return item
                raise AssertionError("no last item")

            handle = engine.open_stream(loop)
            handle.request_segments(options)
            handle.send(x[:cut])
            await asyncio.sleep(0.05)
            engine.move_streams()
            moved = await read(handle)
            assert isinstance(moved, Moved)
            resumed = engine.open_stream(loop, resume_token=moved.resume_token)
            resumed.request_segments(options)  # the client asks again, as its config does
            resumed.send(x[moved.frames_received :])
            resumed.end()
            assert isinstance(await read(resumed), Ended)
            return outputs, events

        outputs, events = asyncio.run(run())
    finally:
        engine.stop()
    probs = model.offline(x)
    testing.assert_allclose(_joined(outputs), probs, atol=1e-4, rtol=1e-4)
    expected = SpeechSegmenter(options, 512, 16000).push(probs[:, 0].tolist())
    assert events == expected and len(expected) >= 2


class TickLog:
    """A `Device` that records what each tick did: the slots it stepped, the
    rows restored before it and how many device calls those took. With
    `park()`, the next tick waits in its dispatch (holding no lock) until
    `release()`: streams admitted meanwhile all join the tick after it."""

    def __init__(self, device: Any) -> None:
        self._device = device
        self.ticks: list[tuple[set[int], list[int], int]] = []  # stepped, restored, write calls
        self._restored: list[int] = []
        self._write_calls = 0
        self._writing = False
        self.write_threads: set[str] = set()
        self._park = False
        self.parked = threading.Event()
        self._release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._device, name)

    def count_write_calls(self) -> None:
        """Counts the calls of the programs that write resumed rows (after `start`)."""

        def counted(program: Any) -> Any:
            def call(*args: Any) -> Any:
                # The program also resets new streams' slots: only the
                # calls `write_rows` makes are writes of resumed rows.
                self._write_calls += self._writing
                return program(*args)

            return call

        self._device._write = counted(self._device._write)

    def write_rows(self, rows: list[tuple[int, tuple[np.ndarray, ...]]]) -> None:
        self.write_threads.add(threading.current_thread().name)
        self._restored += [slot for slot, _ in rows]
        self._writing = True
        try:
            self._device.write_rows(rows)
        finally:
            self._writing = False

    def dispatch(self, slot_ids: np.ndarray, x: np.ndarray, lengths: np.ndarray) -> Any:
        if self._park:
            self._park = False
            self.parked.set()
            self._release.wait(timeout=60)
        stepped = {int(s) for s in slot_ids if s != self._device.padding_slot}
        self.ticks.append((stepped, self._restored, self._write_calls))
        self._restored, self._write_calls = [], 0
        return self._device.dispatch(slot_ids, x, lengths)

    def park(self) -> None:
        self._park = True

    def release(self) -> None:
        self._release.set()


def test_64_streams_move_into_a_replica_where_32_keep_running() -> None:
    """The issue's migration under load: 64 streams move from A into B while
    32 resident streams run on B. B's first tick is held while the 64 resume,
    so all 64 are waiting for their rows at once, the worst case: their rows
    are written over the next ticks, at most `restore_bytes_per_tick` (10
    rows here) a tick, one device call a row, every row once and in the
    tick that first steps its stream; every resident is stepped in every
    tick from its first chunk to its last. Every output == offline."""
    model = _asr_like()
    source = Runtime(
        {"asr": model},
        SchedulerConfig(max_streams=64, buckets=(64,), max_batch_delay_ms=1.0),
        resume_keys=KEYS,
    )
    source.start()
    row_bytes = sum(
        math.prod(shape) * dtype.itemsize
        for shape, dtype in source.engines["asr"].device.row_layout
    )
    per_tick = 10
    target = Runtime(
        {"asr": dataclasses.replace(model)},
        # A large backlog: residents are never held back because this test
        # reads their outputs late, so each is ready for every tick.
        SchedulerConfig(
            max_streams=96,
            buckets=(96,),
            max_batch_delay_ms=1.0,
            max_output_backlog=1000,
            restore_bytes_per_tick=per_tick * row_bytes + row_bytes // 2,
        ),
        resume_keys=KEYS,
    )
    log = TickLog(target.engines["asr"].device)
    target.engines["asr"].device = log
    target.start()
    log.count_write_calls()
    rng = np.random.default_rng(7)
    moved_x = [rng.normal(size=(60, 2)).astype(np.float32) for _ in range(64)]
    resident_x = [rng.normal(size=(60, 2)).astype(np.float32) for _ in range(32)]

    async def run() -> tuple[list[np.ndarray], list[np.ndarray], list[int], list[int]]:
        moving = [source.open_stream("asr") for _ in moved_x]
        moved_out: list[dict[int, np.ndarray]] = [{} for _ in moved_x]
        firsts = [asyncio.create_task(_collect(h, o)) for h, o in zip(moving, moved_out)]
        for handle, x in zip(moving, moved_x, strict=True):
            handle.send(x[:21])
        # The target's first tick (residents only) parks until the 64 resumed.
        log.park()
        residents = [target.open_stream("asr") for _ in resident_x]
        for handle, x in zip(residents, resident_x, strict=True):
            handle.send(x)
            handle.end()
        resident_out: list[dict[int, np.ndarray]] = [{} for _ in resident_x]
        resident_tasks = [
            asyncio.create_task(_collect(h, o)) for h, o in zip(residents, resident_out)
        ]
        assert await asyncio.to_thread(log.parked.wait, 60), "the target never ticked"
        assert source.move_streams() == 64
        tokens = []
        for handle, first in zip(moving, firsts, strict=True):
            moved = await asyncio.wait_for(first, 60)
            assert isinstance(moved, Moved) and moved.frames_received == 21
            handle.cancel()
            tokens.append(moved.resume_token)
        resumed = [target.open_stream("asr", resume_token=t) for t in tokens]
        for handle, x in zip(resumed, moved_x, strict=True):
            handle.send(x[21:])
            handle.end()
        # Read while the tick thread is parked: nothing changes the table now.
        slots = {s.stream_id: s.slot for s in target.engines["asr"].scheduler.streams()}
        log.release()
        for handle, outputs in zip(resumed, moved_out, strict=True):
            assert isinstance(await asyncio.wait_for(_collect(handle, outputs), 60), Ended)
            handle.cancel()
        for handle, task in zip(residents, resident_tasks, strict=True):
            assert isinstance(await asyncio.wait_for(task, 60), Ended)
            handle.cancel()
        resident_slots = [slots[h.stream_id] for h in residents]
        resumed_slots = [slots[h.stream_id] for h in resumed]
        return (
            [_joined(o) for o in moved_out],
            [_joined(o) for o in resident_out],
            resident_slots,
            resumed_slots,
        )

    try:
        moved_y, resident_y, resident_slots, resumed_slots = asyncio.run(run())
    finally:
        log.release()
        source.stop()
        target.stop()
    for x, y in zip([*moved_x, *resident_x], [*moved_y, *resident_y], strict=True):
        testing.assert_allclose(y, model.offline(x), atol=1e-5, rtol=1e-5)

    restoring = [i for i, (_, restored, _) in enumerate(log.ticks) if restored]
    # The burst goes out in full ticks of 10 rows, one after another.
    assert len(restoring) == math.ceil(64 / per_tick), f"restores in ticks {restoring}"
    assert restoring == list(range(restoring[0], restoring[0] + len(restoring)))
    restored_each = [log.ticks[i][1] for i in restoring]
    assert [len(r) for r in restored_each] == [per_tick] * 6 + [4]
    all_restored = [slot for restored in restored_each for slot in restored]
    assert sorted(all_restored) == sorted(resumed_slots)  # each row once
    for i, restored in zip(restoring, restored_each, strict=True):
        stepped, _, write_calls = log.ticks[i]
        # One device call per row, on the tick thread (never on a door's
        # loop under the engine lock), in the tick that first steps them.
        assert write_calls == len(restored)
        assert set(restored) <= stepped
        earlier = set().union(*(s for s, _, _ in log.ticks[:i]))
        assert not earlier & set(restored), "a resumed stream stepped before its row was written"
        assert set(resident_slots) <= stepped
    assert log.write_threads == {"tick-asr"}
    # No resident misses a tick: each is in every tick from its first to its last.
    for slot in resident_slots:
        ticks = [i for i, (s, _, _) in enumerate(log.ticks) if slot in s]
        assert ticks == list(range(ticks[0], ticks[-1] + 1)), f"resident in slot {slot}: {ticks}"
        assert ticks[0] <= restoring[0] and restoring[-1] < ticks[-1]
