"""Stream migration end to end: two real `sl-serve` processes sharing a
resume key. Streams run on the first; it gets SIGTERM mid-stream; every
stream moves to the second (the project's client follows the move) and its
outputs equal offline, over gRPC and WebSocket, for a model with input
latency, a strided conv and a KV cache, and for one with output_ratio 3.
Refused tokens (tampered, foreign key, other model, expired) get their
status on both doors and the server keeps serving. The admin drain call
(`POST /v1/admin/drain`) moves streams as SIGTERM does."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import websockets

import sequence_layers as sl
from clients.client import AsyncGrpcClient, AsyncWebSocketClient, Moved, Output, chunked
from protos import streaming_pb2 as pb
from protos import streaming_pb2_grpc as pb_grpc
from sequence_layers import testing
from server.model import ServableModel, init_variables, load_model_dir, save_model_dir
from server.resume import ResumeKeys, StreamSnapshot, model_fingerprint, sign_token
from tests.server.serving import ServerProcess

pytestmark = pytest.mark.e2e  # starts server processes: not in `make test-fast`

KEY = "k" * 48
ADMIN_KEY = "admin-" + "a" * 32


def _models(root: Path) -> dict[str, Path]:
    asr = sl.Serial.Config(
        (
            sl.Conv1D.Config(filters=4, kernel_size=3, padding="reverse_causal"),
            sl.Conv1D.Config(filters=4, kernel_size=3, strides=2, padding="causal"),
            sl.DotProductSelfAttention.Config(num_heads=2, units_per_head=2, max_past_horizon=5),
            sl.Flatten.Config(),
            sl.LSTM.Config(units=3),
        )
    )
    up = sl.Serial.Config(
        (
            sl.Conv1D.Config(filters=3, kernel_size=3, padding="causal"),
            sl.Conv1DTranspose.Config(filters=2, kernel_size=6, strides=3, padding="causal"),
        )
    )
    dirs = {}
    for name, config, seed in (("asr", asr, 3), ("up", up, 4)):
        model = ServableModel(name, config, init_variables(config, (2,), seed=seed), (2,))
        dirs[name] = save_model_dir(model, root / name)
    return dirs


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _models(tmp_path_factory.mktemp("migration-models"))


def _args(dirs: dict[str, Path], key_file: Path) -> list[str]:
    return [
        *(a for name, d in dirs.items() for a in ("--model", f"{name}={d}")),
        "--resume-key-file",
        str(key_file),
        "--max-streams",
        "8",
        "--buckets",
        "8",
        "--max-batch-delay-ms",
        "2",
        "--drain-seconds",
        "0.3",
    ]


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "resume-keys"
    path.write_text(f"# newest first\n{KEY}\n")
    return path


@pytest.fixture(scope="module")
def pair(
    model_dirs: dict[str, Path], key_file: Path
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    source = ServerProcess(_args(model_dirs, key_file))
    try:
        target = ServerProcess(_args(model_dirs, key_file))
    except BaseException:
        source.kill()
        raise
    try:
        yield source, target
    finally:
        for server in (source, target):
            if server.proc.poll() is None:
                server.terminate()


async def _paced(x: np.ndarray, frames: int) -> AsyncIterator[np.ndarray]:
    for chunk in chunked(x, frames):
        await asyncio.sleep(0.02)
        yield chunk


async def _run(events: AsyncIterator[Any], first_output: asyncio.Event) -> tuple[np.ndarray, int]:
    """A stream's outputs (offsets checked by the client) and its moves."""
    frames, moves = [], 0
    async for event in events:
        if isinstance(event, Output):
            frames.append(event.frames)
            first_output.set()
        elif isinstance(event, Moved):
            moves += 1
    return np.concatenate(frames), moves


def test_sigterm_moves_every_stream_to_the_other_replica(
    pair: tuple[ServerProcess, ServerProcess], model_dirs: dict[str, Path]
) -> None:
    source, target = pair
    rng = np.random.default_rng(0)
    # (door, model): both doors, both models, two streams each.
    plan = [(door, model) for door in ("grpc", "ws") for model in ("asr", "up")] * 2
    inputs = [rng.normal(size=(150, 2)).astype(np.float32) for _ in plan]

    async def run() -> list[tuple[np.ndarray, int]]:
        grpc_client = AsyncGrpcClient([source.grpc_target, target.grpc_target])
        ws_client = AsyncWebSocketClient([source.ws_url, target.ws_url])
        started = [asyncio.Event() for _ in plan]
        tasks = []
        for (door, model), x, first in zip(plan, inputs, started, strict=True):
            client: Any = grpc_client if door == "grpc" else ws_client
            events = client.stream(model, _paced(x, 5), report_moves=True)
            tasks.append(asyncio.create_task(_run(events, first)))
        # Mid-stream: every stream has outputs, and most of its input is still to come.
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        source.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(asyncio.gather(*tasks), 60)
        finally:
            await grpc_client.close()

    results = asyncio.run(run())
    assert source.proc.wait(timeout=30) == 0, source.log()
    for (door, model), x, (y, moves) in zip(plan, inputs, results, strict=True):
        assert moves == 1, f"{door} {model}: moved {moves} times"
        expected = load_model_dir(model_dirs[model], name=model).offline(x)
        testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)


def _tokens(model_dirs: dict[str, Path]) -> dict[str, tuple[str, bytes, str]]:
    """(model to open, token, expected status) per refusal."""
    asr = load_model_dir(model_dirs["asr"], name="asr")
    up = load_model_dir(model_dirs["up"], name="up")
    snapshot = StreamSnapshot(
        stream_id="s",
        frames_received=0,
        frames_consumed=0,
        frames_emitted=0,
        ticks=0,
        outputs_to_drop=0,
        buffered_input=np.zeros((0, 2), np.float32),
        state=(),
    )
    keys, foreign = ResumeKeys((KEY.encode(),)), ResumeKeys((b"f" * 48,))
    fp = model_fingerprint(asr)
    good = sign_token(snapshot, keys, model_name="asr", fingerprint=fp)
    tampered = bytearray(good)
    tampered[40] ^= 1
    return {
        "tampered": ("asr", bytes(tampered), "PERMISSION_DENIED"),
        "foreign key": (
            "asr",
            sign_token(snapshot, foreign, model_name="asr", fingerprint=fp),
            "PERMISSION_DENIED",
        ),
        "other model": (
            "asr",
            sign_token(snapshot, keys, model_name="up", fingerprint=model_fingerprint(up)),
            "FAILED_PRECONDITION",
        ),
        "expired": (
            "asr",
            sign_token(snapshot, keys, model_name="asr", fingerprint=fp, now=1e9),
            "DEADLINE_EXCEEDED",
        ),
    }


async def _grpc_refusal(target: str, model: str, token: bytes) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.StreamingInferenceStub(channel)

        async def requests() -> AsyncIterator[pb.StreamRequest]:
            yield pb.StreamRequest(config=pb.StreamConfig(model=model, resume_token=token))

        try:
            async for _ in stub.Stream(requests()):
                pass
        except grpc.aio.AioRpcError as e:
            return e.code().name
    return "OK"


async def _ws_refusal(base: str, model: str, token: bytes, in_message: bool) -> tuple[str, int]:
    text = base64.urlsafe_b64encode(token).decode().rstrip("=")
    url = f"{base}/v1/models/{model}/stream?" + (
        "resume=1" if in_message else f"resume_token={text}"
    )
    async with websockets.connect(url) as ws:
        if in_message:
            await ws.send(json.dumps({"type": "config", "resume_token": text}))
        error = json.loads(await ws.recv())
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert ws.close_code is not None
        return error.get("code", error["type"]), ws.close_code


def test_refused_tokens_get_their_status_and_the_server_keeps_serving(
    pair: tuple[ServerProcess, ServerProcess], model_dirs: dict[str, Path]
) -> None:
    _, target = pair
    if target.proc.poll() is not None:
        pytest.skip("the target replica is gone")
    cases = _tokens(model_dirs)

    async def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, (name, (model, token, _)) in enumerate(cases.items()):
            out[name] = (
                await _grpc_refusal(target.grpc_target, model, token),
                await _ws_refusal(target.ws_url, model, token, in_message=i % 2 == 1),
            )
        x = np.ones((30, 2), np.float32)
        async with AsyncGrpcClient(target.grpc_target) as client:
            out["serving"] = len(await client.infer("asr", x, chunk_frames=7))
        return out

    out = asyncio.run(run())
    for name, (_, _, code) in cases.items():
        ws_close = 1007 if code == "INVALID_ARGUMENT" else 1008
        assert out[name] == (code, (code, ws_close)), name
    expected = load_model_dir(model_dirs["asr"], name="asr").offline(np.ones((30, 2), np.float32))
    assert out["serving"] == len(expected)


def _post(url: str, authorization: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {} if authorization is None else {"Authorization": authorization}
    request = urllib.request.Request(url, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def test_admin_drain_moves_every_stream_then_the_process_exits(
    pair: tuple[ServerProcess, ServerProcess],
    model_dirs: dict[str, Path],
    key_file: Path,
    tmp_path: Path,
) -> None:
    """`POST /v1/admin/drain?grace_s=0` drains as SIGTERM does, without the
    `--drain-seconds` wait (a minute here: a drain that waited would see the
    streams end instead of move)."""
    _, target = pair
    if target.proc.poll() is not None:
        pytest.skip("the target replica is gone")
    admin_file = tmp_path / "admin-keys"
    admin_file.write_text(f"{ADMIN_KEY}\n")
    args = _args({"asr": model_dirs["asr"]}, key_file)
    first = ServerProcess([*args, "--drain-seconds", "60", "--admin-key-file", str(admin_file)])
    drain_url = f"{first.http_url}/v1/admin/drain?grace_s=0"
    rng = np.random.default_rng(1)
    plan = ["grpc", "ws"] * 2
    inputs = [rng.normal(size=(300, 2)).astype(np.float32) for _ in plan]
    try:

        async def run() -> tuple[list[tuple[np.ndarray, int]], list[tuple[int, Any]]]:
            grpc_client = AsyncGrpcClient([first.grpc_target, target.grpc_target])
            ws_client = AsyncWebSocketClient([first.ws_url, target.ws_url])
            started = [asyncio.Event() for _ in plan]
            tasks = []
            for door, x, first_output in zip(plan, inputs, started, strict=True):
                client: Any = grpc_client if door == "grpc" else ws_client
                events = client.stream("asr", _paced(x, 5), report_moves=True)
                tasks.append(asyncio.create_task(_run(events, first_output)))
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            calls = [
                # Admin keys configured: loopback alone is not enough, nor a wrong key.
                await asyncio.to_thread(_post, drain_url),
                await asyncio.to_thread(_post, drain_url, "Bearer not-the-key"),
                await asyncio.to_thread(_post, drain_url, f"Bearer {ADMIN_KEY}"),
            ]
            try:
                return await asyncio.wait_for(asyncio.gather(*tasks), 60), calls
            finally:
                await grpc_client.close()

        results, calls = asyncio.run(run())
        assert first.proc.wait(timeout=30) == 0, first.log()
    finally:
        if first.proc.poll() is None:
            first.kill()
    assert [status for status, _ in calls] == [401, 401, 202]
    assert calls[2][1] == {"draining": True, "streams": len(plan), "grace_s": 0.0}
    expected = load_model_dir(model_dirs["asr"], name="asr")
    for door, x, (y, moves) in zip(plan, inputs, results, strict=True):
        assert moves == 1, f"{door}: moved {moves} times"
        testing.assert_allclose(y, expected.offline(x), atol=1e-5, rtol=1e-5)
