"""Clients follow a moved stream, through real sockets: fake replicas
(tests/clients/fake_servers.py, real gRPC and WebSocket servers with real
resume tokens) hand a stream off mid-chunk while the client is sending
ahead; the client resumes on the next URL (or the same one), resends from
`frames_received`, and its outputs equal one uninterrupted stream with no
gap and no duplicate. Refusals that another replica may not share are
retried there; the others surface as the server's status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import clients.client as client_module
from clients import Moved, Output, ResumeOptions, Started, StreamingError
from clients.client import Client, Ended, PermissionDeniedError, aconnect, chunked, collect
from clients.resume import InputLog, acknowledged_frames, next_url
from clients.stream_cli import main as stream_main
from server.resume import ResumeKeys
from tests.clients.fake_servers import Behaviour, FakeReplicas, offline, replicas

FRAMES = 203  # not a multiple of the fake model's 4-frame chunk
X = np.arange(FRAMES, dtype=np.float32).reshape(-1, 1)  # x[t] = t: the fake checks order


def urls(fakes: FakeReplicas, door: str) -> list[str]:
    return fakes.grpc_urls if door == "grpc" else fakes.ws_urls


async def run_stream(
    url: str | list[str], *, report: bool = True, **kw: object
) -> tuple[np.ndarray, list[object]]:
    client = aconnect(url, **kw)  # type: ignore[arg-type]
    events: list[object] = []
    frames: list[np.ndarray] = []
    delivered = 0
    try:
        async for event in client.stream("fake", chunked(X, 7), report_moves=report):
            events.append(event)
            if isinstance(event, Output):
                assert event.offset == delivered  # contiguous, never repeated
                delivered += len(event.frames)
                frames.append(event.frames)
    finally:
        await client.close()
    return np.concatenate(frames), events


@pytest.mark.parametrize("door", ["grpc", "ws"])
def test_stream_moves_to_the_next_url_mid_chunk_without_gap_or_duplicate(door: str) -> None:
    # 42 frames received at the move: 40 stepped, 2 buffered inside the token,
    # while the client has sent further (the fake ignores it): resend from 42.
    with replicas(Behaviour(move_after=42), Behaviour()) as fakes:
        y, events = asyncio.run(run_stream(urls(fakes, door)))
        a, b = (beh.log for beh in fakes.behaviours)
    np.testing.assert_array_equal(y, offline(X))  # exact: atol = rtol = 0
    assert a == [{"opened": True}, {"moved": 42}]
    assert {"resumed": 42, "emitted": 40 - 2} in b  # 2 outputs dropped (latency)
    moves = [e for e in events if isinstance(e, Moved)]
    assert len(moves) == 1 and moves[0].frames_received == 42
    assert urls(fakes, door)[1].endswith(moves[0].url)  # gRPC reports HOST:PORT
    assert sum(isinstance(e, Started) for e in events) == 1  # the resume is transparent
    ended = events[-1]
    assert isinstance(ended, Ended) and ended.frames_in == FRAMES
    assert ended.frames_out == FRAMES - 2


@pytest.mark.parametrize("door", ["grpc", "ws"])
def test_same_url_twice_and_moves_again(door: str) -> None:
    # One URL (a load balancer): the stream resumes there, and moves twice.
    with replicas(Behaviour(move_after=30, moves=2)) as fakes:
        y, events = asyncio.run(run_stream(urls(fakes, door)[0]))
        log = fakes.behaviours[0].log
    np.testing.assert_array_equal(y, offline(X))
    moved = [entry["moved"] for entry in log if "moved" in entry]
    resumed = [entry["resumed"] for entry in log if "resumed" in entry]
    assert moved == resumed and len(moved) == 2 and moved[0] >= 30 and moved[1] > moved[0]
    moves = [e for e in events if isinstance(e, Moved)]
    assert len(moves) == 2 and all(urls(fakes, door)[0].endswith(m.url) for m in moves)


def test_outputs_repeated_after_a_resume_are_dropped() -> None:
    with replicas(Behaviour(move_after=42), Behaviour(repeat_last_output=True)) as fakes:
        y, _ = asyncio.run(run_stream(fakes.grpc_urls))
    np.testing.assert_array_equal(y, offline(X))


def test_long_tokens_travel_in_the_first_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "MAX_QUERY_TOKEN_CHARS", 10)
    with replicas(Behaviour(move_after=42), Behaviour()) as fakes:
        y, _ = asyncio.run(run_stream(fakes.ws_urls))
        log = fakes.behaviours[1].log
    np.testing.assert_array_equal(y, offline(X))
    assert {"token_in": "message"} in log


def test_query_tokens_are_base64url() -> None:
    with replicas(Behaviour(move_after=42), Behaviour()) as fakes:
        asyncio.run(run_stream(fakes.ws_urls))
        assert {"token_in": "query"} in fakes.behaviours[1].log


@pytest.mark.parametrize("door", ["grpc", "ws"])
def test_draining_full_and_other_version_replicas_are_skipped(door: str) -> None:
    with replicas(
        Behaviour(move_after=42),
        Behaviour(refuse="UNAVAILABLE"),
        Behaviour(refuse="RESOURCE_EXHAUSTED"),
        Behaviour(refuse="FAILED_PRECONDITION"),  # mid-rollout: another model version
        Behaviour(),
    ) as fakes:
        y, events = asyncio.run(run_stream(urls(fakes, door)))
    np.testing.assert_array_equal(y, offline(X))
    moves = [e for e in events if isinstance(e, Moved)]
    assert len(moves) == 1 and urls(fakes, door)[4].endswith(moves[0].url)


@pytest.mark.parametrize("door", ["grpc", "ws"])
def test_a_replica_with_other_keys_refuses_and_the_client_says_why(door: str) -> None:
    other = ResumeKeys((b"z" * 40,))
    with replicas(Behaviour(move_after=42), Behaviour(keys=other)) as fakes:
        with pytest.raises(StreamingError) as info:
            asyncio.run(run_stream(urls(fakes, door)))
        assert fakes.behaviours[1].log[-1] == {"refused": "PERMISSION_DENIED"}
    assert isinstance(info.value, PermissionDeniedError)
    assert "does not hold" in info.value.message


def test_no_replica_takes_the_token_within_the_budget() -> None:
    options = ResumeOptions(max_attempts=3, backoff_s=0.01)
    draining = Behaviour(move_after=42, drains=True)
    with replicas(draining, Behaviour(refuse="UNAVAILABLE")) as fakes:
        with pytest.raises(StreamingError, match="no server resumed it") as info:
            asyncio.run(run_stream(fakes.grpc_urls, resume=options))
        assert len(fakes.behaviours[1].log) == 0  # refused before opening
    assert info.value.code == "UNAVAILABLE"


def test_resume_off_makes_moved_an_error() -> None:
    with replicas(Behaviour(move_after=42), Behaviour()) as fakes:
        with pytest.raises(StreamingError, match="resume is off") as info:
            asyncio.run(run_stream(fakes.ws_urls, resume=ResumeOptions(enabled=False)))
    assert info.value.code == "UNAVAILABLE"


@pytest.mark.parametrize("door", ["grpc", "ws"])
def test_sync_client_follows_moves(door: str) -> None:
    with replicas(Behaviour(move_after=50), Behaviour()) as fakes:
        with Client(urls(fakes, door)) as client:
            events = client.stream("fake", chunked(X, 9))
            y = client.infer("fake", X, chunk_frames=5)  # a second stream: not moved
    outputs = [e.frames for e in events if isinstance(e, Output)]
    np.testing.assert_array_equal(np.concatenate(outputs), offline(X))
    np.testing.assert_array_equal(y, offline(X))


@pytest.mark.parametrize("door", ["grpc", "ws"])
def test_sl_stream_follows_a_move_to_the_next_server(
    door: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "in.npy", X)
    with replicas(Behaviour(move_after=42), Behaviour()) as fakes:
        a, b = urls(fakes, door)
        args = ["--server", a, "--server", b, "--model", "fake", "--no-progress", "--chunk-ms", "5"]
        code = stream_main([*args, str(tmp_path / "in.npy"), str(tmp_path / "out.npy")])
    err = capsys.readouterr().err
    assert code == 0, err
    # 5 ms chunks at the model's 16 kHz are 80 frames: the move comes at 80.
    assert "handed the stream off; resumed on" in err and "input frame 80" in err
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), offline(X))


def test_a_failing_input_iterator_surfaces_its_own_error() -> None:
    async def source() -> AsyncIterator[np.ndarray]:
        yield X[:8]
        raise RuntimeError("microphone unplugged")

    async def main() -> None:
        with replicas(Behaviour()) as fakes:
            async with aconnect(fakes.grpc_urls[0]) as client:
                await collect(client.stream("fake", source()))

    with pytest.raises(RuntimeError, match="microphone unplugged"):
        asyncio.run(main())


def test_input_log_keeps_only_what_the_server_may_lack() -> None:
    async def main() -> None:
        async def source() -> AsyncIterator[np.ndarray]:
            for c in chunked(X[:40], 10):
                yield c

        log = InputLog(source(), max_bytes=100)  # chunks of 10 float32 frames: 40 bytes
        pump = asyncio.create_task(log.pump())
        await asyncio.sleep(0.05)
        assert log.taken == 30  # bounded: the 4th chunk waits for an ack
        await log.ack(12)
        await asyncio.wait_for(pump, 1)
        assert (log.first, log.taken) == (10, 40)
        got = [c async for c in log.chunks_from(13)]
        np.testing.assert_array_equal(np.concatenate(got), X[13:40])
        with pytest.raises(ValueError, match="kept frames 10 to 40"):
            [c async for c in log.chunks_from(5)]

    asyncio.run(main())


def test_acknowledged_frames_and_url_order() -> None:
    model = {"output_ratio": {"numerator": 1, "denominator": 4}, "output_latency": 3}
    # 10 outputs + 3 dropped need 13 raw outputs = 52 input frames stepped.
    assert acknowledged_frames(10, model) == 52
    vocoder = {"output_ratio": {"numerator": 160, "denominator": 1}, "output_latency": 0}
    assert acknowledged_frames(321, vocoder) == int(Fraction(321, 160))
    assert acknowledged_frames(0, model) == 0 and acknowledged_frames(5, {}) == 0
    assert [next_url(1, a, 3) for a in range(4)] == [2, 0, 1, 2]
    assert [next_url(0, a, 1) for a in range(3)] == [0, 0, 0]
