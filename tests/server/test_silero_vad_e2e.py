"""Silero VAD through a real `sl-serve`: streams over gRPC and WebSocket in
random chunk sizes give per-window probabilities equal to the official ONNX
model, and the speech events each stream asked for equal the official
`VADIterator` on the same probabilities; `sl-stream` prints a file's
segments as the official `get_speech_timestamps_from_probs` gives them."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clients.client import (
    AsyncGrpcClient,
    AsyncWebSocketClient,
    Ended,
    Output,
    Speech,
    StreamingError,
)
from server import silero_vad
from tests.server.serving import ServerProcess, running_server
from tests.server.vad_audio import (
    official_events,
    official_segments,
    onnx_probs,
    speech_mix,
    wheel_or_skip,
)

ATOL, RTOL = 1e-4, 1e-4  # float32 vs ONNX Runtime float32 (see test_silero_vad.py)


@pytest.fixture(scope="module")
def wheel() -> Path:
    return wheel_or_skip()


@pytest.fixture(scope="module")
def server(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = silero_vad.import_to(tmp_path_factory.mktemp("models") / "vad", str(wheel))
    args = ["--model", f"silero-vad={directory}", "--model", "logmel", "--max-streams", "8"]
    args += ["--buckets", "8", "--chunk-blocks", "1", "--max-batch-delay-ms", "2"]
    with running_server(args) as s:
        yield s


def _chunks(x: np.ndarray, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while i < len(x):
        n = int(rng.integers(1, 3000))
        out.append(x[i : i + n, None])
        i += n
    return out


async def _run(client: object, x: np.ndarray, seed: int, segments: dict | None) -> tuple:
    probs: list[np.ndarray] = []
    events: list[dict[str, int]] = []
    ended = None
    received = 0
    async for event in client.stream(  # type: ignore[attr-defined]
        "silero-vad", _chunks(x, seed), speech_segments=segments
    ):
        if isinstance(event, Output):
            assert event.offset == received
            received += len(event.frames)
            probs.append(event.frames[:, 0])
        elif isinstance(event, Speech):
            # An event follows the output that caused it.
            key = "start" if event.kind == "speech_started" else "end"
            assert event.sample <= received * 512
            events.append({key: event.sample})
        elif isinstance(event, Ended):
            ended = event
    assert ended is not None and ended.frames_in == len(x)
    return np.concatenate(probs), events


SEGMENT_OPTIONS = [
    {},
    {"threshold": 0.6, "speech_pad_ms": 0},
    None,
    {"min_silence_duration_ms": 300},
]


def test_grpc_and_websocket_equal_onnx_runtime(server: ServerProcess, wheel: Path) -> None:
    inputs = [speech_mix(seed) for seed in range(4)]

    async def main() -> list[tuple]:
        grpc_client = AsyncGrpcClient(server.grpc_target)
        ws_client = AsyncWebSocketClient(server.ws_url)
        jobs = [
            _run(grpc_client if i % 2 == 0 else ws_client, x, 10 + i, SEGMENT_OPTIONS[i])
            for i, x in enumerate(inputs)
        ]
        try:
            return await asyncio.gather(*jobs)
        finally:
            await grpc_client.close()

    results = asyncio.run(main())
    for i, (x, (probs, events)) in enumerate(zip(inputs, results, strict=True)):
        expected = onnx_probs(wheel, x)
        assert probs.dtype == np.float32 and probs.shape == expected.shape
        np.testing.assert_allclose(probs, expected, rtol=RTOL, atol=ATOL)
        options = SEGMENT_OPTIONS[i]
        if options is None:
            assert events == []
        else:
            assert events == official_events(wheel, probs, **options)
            assert len(events) >= 2


def test_model_info_and_segment_errors(server: ServerProcess) -> None:
    async def main() -> None:
        async with AsyncGrpcClient(server.grpc_target) as client:
            info = await client.get_model("silero-vad")
            assert info["speech_segments"] is True
            assert (info["block_size"], info["output_shape"], info["sample_rate"]) == (
                512,
                [1],
                16000,
            )
            assert (await client.get_model("logmel"))["speech_segments"] is False
        for client in (AsyncGrpcClient(server.grpc_target), AsyncWebSocketClient(server.ws_url)):
            with pytest.raises(StreamingError, match="no speech-probability output") as e:
                async for _ in client.stream(
                    "logmel", [np.zeros((160, 1), np.float32)], speech_segments={}
                ):
                    pass
            assert e.value.code == "INVALID_ARGUMENT"
            with pytest.raises(StreamingError, match="neg_threshold") as e:
                async for _ in client.stream(
                    "silero-vad",
                    [np.zeros((512, 1), np.float32)],
                    speech_segments={"threshold": 0.3, "neg_threshold": 0.5},
                ):
                    pass
            assert e.value.code == "INVALID_ARGUMENT"
            await client.close()

    asyncio.run(main())


@pytest.mark.parametrize("door", ["grpc", "ws"])
def test_sl_stream_prints_official_segments(
    server: ServerProcess, wheel: Path, door: str, tmp_path: Path
) -> None:
    x = speech_mix(5)
    pcm = np.round(x * 32767).astype("<i2")
    path = tmp_path / "speech.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    url = f"grpc://{server.grpc_target}" if door == "grpc" else server.ws_url
    out = tmp_path / "probs.npy"
    cmd = [str(Path(sys.executable).parent / "sl-stream"), "--url", url, "--model", "silero-vad"]
    result = subprocess.run(
        [*cmd, "--no-progress", str(path), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    probs = np.load(out)[:, 0]
    np.testing.assert_allclose(
        probs, onnx_probs(wheel, pcm.astype(np.float32) / 32768), rtol=RTOL, atol=ATOL
    )
    printed = [
        {"start": int(m[1]), "end": int(m[2])}
        for m in re.finditer(r"^  (\d+)-(\d+) samples", result.stdout, re.M)
    ]
    assert printed == official_segments(wheel, probs, len(pcm))
    assert f"speech segments: {len(printed)}" in result.stdout and len(printed) >= 2
