"""End to end through a real `sl-serve` process and real sockets: streams in
random chunk sizes over gRPC and WebSocket equal `sl-offline`; every pinned
error gets its code while a healthy stream carries on; auth, capacity,
reflection and graceful drain."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import websockets
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import sequence_layers as sl
from clients.client import (
    AsyncGrpcClient,
    AsyncWebSocketClient,
    StreamingError,
    chunked,
    collect,
)
from protos import streaming_pb2 as pb
from protos import streaming_pb2_grpc as pb_grpc
from server.app.cli import offline_main
from server.model import ServableModel, init_variables, save_model_dir
from tests.server.serving import ServerProcess, running_server

pytestmark = pytest.mark.e2e  # starts server processes: not in `make test-fast`


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = sl.Serial.Config(
        (
            sl.Conv1D.Config(filters=6, kernel_size=5, padding="reverse_causal"),
            sl.Conv1D.Config(filters=6, kernel_size=3, strides=2, padding="causal"),
            sl.LSTM.Config(units=5),
        )
    )
    model = ServableModel("small", config, init_variables(config, (3,), seed=7), (3,))
    return save_model_dir(model, tmp_path_factory.mktemp("models") / "small")


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerProcess]:
    with running_server(
        [
            "--model",
            f"small={model_dir}",
            "--model",
            "logmel",
            "--max-streams",
            "16",
            "--buckets",
            "4,16",
            "--chunk-blocks",
            "2",
            "--max-batch-delay-ms",
            "2",
        ]
    ) as s:
        yield s


def offline(model: str, x: np.ndarray, tmp: Path) -> np.ndarray:
    """The `sl-offline` command's own code path, in-process."""
    np.save(tmp / "in.npy", x)
    assert offline_main([model, str(tmp / "in.npy"), str(tmp / "out.npy")]) == 0
    return np.load(tmp / "out.npy")


def random_chunks(x: np.ndarray, rng: np.random.Generator, max_frames: int) -> list[np.ndarray]:
    out, i = [], 0
    while i < len(x):
        n = int(rng.integers(1, max_frames + 1))
        out.append(x[i : i + n])
        i += n
    return out


def test_concurrent_streams_on_both_doors_equal_offline(
    server: ServerProcess, model_dir: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(int(rng.integers(5, 80)), 3)).astype(np.float32) for _ in range(16)]
    wave = (rng.normal(size=(4000, 1)) * 0.1).astype(np.float32)

    async def main() -> list[np.ndarray]:
        grpc_client = AsyncGrpcClient(server.grpc_target)
        ws_client = AsyncWebSocketClient(server.ws_url)
        jobs = []
        for i, x in enumerate(inputs):
            client = grpc_client if i % 2 == 0 else ws_client
            chunks = random_chunks(x, np.random.default_rng(i), 9)
            jobs.append(collect(client.stream("small", chunks)))
        jobs.append(collect(grpc_client.stream("logmel", chunked(wave, 700))))
        pcm = (wave * 32767).astype(np.int16)
        jobs.append(collect(ws_client.stream("logmel", chunked(pcm, 1000), dtype="int16")))
        results = await asyncio.gather(*jobs)
        await grpc_client.close()
        return [y for y, _ in results]

    outputs = asyncio.run(main())
    for x, y in zip(inputs, outputs[:16], strict=True):
        np.testing.assert_allclose(y, offline(str(model_dir), x, tmp_path), rtol=1e-5, atol=1e-5)
    mel = offline("logmel", wave, tmp_path)
    np.testing.assert_allclose(outputs[16], mel, rtol=1e-5, atol=1e-5)
    mel_pcm = offline(
        "logmel", (wave * 32767).astype(np.int16).astype(np.float32) / 32768, tmp_path
    )
    np.testing.assert_allclose(outputs[17], mel_pcm, rtol=1e-4, atol=1e-4)


async def _raw_grpc_error(target: str, requests: list[pb.StreamRequest]) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.StreamingInferenceStub(channel)

        async def gen():  # type: ignore[no-untyped-def]
            for r in requests:
                yield r
            await asyncio.sleep(5)  # keep the stream open: the server must end it

        try:
            async for _ in stub.Stream(gen()):
                pass
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


async def _ws_error(url: str, messages: list[bytes | str]) -> tuple[str, int]:
    async with websockets.connect(url) as ws:
        first = json.loads(await ws.recv())
        if first["type"] == "error":
            await ws.wait_closed()
            return first["code"], ws.close_code or 0
        for m in messages:
            await ws.send(m)
        async for message in ws:
            if isinstance(message, str):
                event = json.loads(message)
                if event["type"] == "error":
                    await ws.wait_closed()
                    return event["code"], ws.close_code or 0
    return "OK", ws.close_code or 0


def test_every_error_gets_its_code_while_a_healthy_stream_finishes(
    server: ServerProcess, model_dir: Path, tmp_path: Path
) -> None:
    config = pb.StreamRequest(config=pb.StreamConfig(model="small"))

    def chunk(values: np.ndarray, shape: list[int] | None = None) -> pb.StreamRequest:
        return pb.StreamRequest(
            chunk=pb.Tensor(
                shape=shape or list(values.shape),
                dtype=pb.FLOAT32,
                data=values.astype("<f4").tobytes(),
            )
        )

    good = np.ones((4, 3), np.float32)
    x = np.random.default_rng(5).normal(size=(60, 3)).astype(np.float32)
    ws = f"{server.ws_url}/v1/models/small/stream"

    async def healthy() -> np.ndarray:
        async def paced():  # type: ignore[no-untyped-def]
            for c in chunked(x, 4):
                await asyncio.sleep(0.02)
                yield c

        async with AsyncGrpcClient(server.grpc_target) as client:
            y, ended = await collect(client.stream("small", paced()))
        assert ended is not None and ended.frames_in == len(x)
        return y

    async def main() -> tuple[np.ndarray, dict[str, object]]:
        task = asyncio.create_task(healthy())
        codes: dict[str, object] = {}
        target = server.grpc_target
        codes["chunk_before_config"] = await _raw_grpc_error(target, [chunk(good)])
        codes["unknown_model"] = await _raw_grpc_error(
            target, [pb.StreamRequest(config=pb.StreamConfig(model="nope"))]
        )
        codes["wrong_shape"] = await _raw_grpc_error(target, [config, chunk(np.ones((4, 5)))])
        codes["wrong_bytes"] = await _raw_grpc_error(target, [config, chunk(good, [5, 3])])
        codes["non_finite"] = await _raw_grpc_error(target, [config, chunk(good * np.nan)])
        codes["second_config"] = await _raw_grpc_error(target, [config, config])
        codes["ws_unknown_model"] = await _ws_error(f"{server.ws_url}/v1/models/nope/stream", [])
        codes["ws_wrong_bytes"] = await _ws_error(ws, [b"\x00" * 10])
        codes["ws_non_finite"] = await _ws_error(ws, [(good * np.inf).tobytes()])
        codes["ws_bad_text"] = await _ws_error(ws, ["hello"])
        codes["ws_bad_dtype"] = await _ws_error(ws + "?dtype=float64", [])
        async with AsyncGrpcClient(server.grpc_target) as client:
            with pytest.raises(StreamingError) as info:
                await client.get_model("nope")
            codes["get_model"] = info.value.code
        return await task, codes

    y, codes = asyncio.run(main())
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert codes == {
        "chunk_before_config": invalid,
        "unknown_model": grpc.StatusCode.NOT_FOUND,
        "wrong_shape": invalid,
        "wrong_bytes": invalid,
        "non_finite": invalid,
        "second_config": invalid,
        "ws_unknown_model": ("NOT_FOUND", 1008),
        "ws_wrong_bytes": ("INVALID_ARGUMENT", 1007),
        "ws_non_finite": ("INVALID_ARGUMENT", 1007),
        "ws_bad_text": ("INVALID_ARGUMENT", 1007),
        "ws_bad_dtype": ("INVALID_ARGUMENT", 1007),
        "get_model": "NOT_FOUND",
    }
    np.testing.assert_allclose(y, offline(str(model_dir), x, tmp_path), rtol=1e-5, atol=1e-5)
    body = urllib.request.urlopen(f"{server.http_url}/metrics").read().decode()
    assert 'sl_errors_total{code="INVALID_ARGUMENT"' in body
    assert "sl_chunk_latency_seconds_count" in body


def test_http_endpoints(server: ServerProcess) -> None:
    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(server.http_url + path) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    assert get("/healthz")[0] == 200
    # The run's shared compilation cache (tests/conftest.py) holds its programs.
    assert any(Path(os.environ["SL_COMPILE_CACHE_DIR"]).iterdir())
    status, body = get("/readyz")
    assert status == 200
    assert json.loads(body) == {"status": "ready", "models": {"small": "ready", "logmel": "ready"}}
    assert get("/readyz?model=logmel") == (200, b'{"status":"ready"}')
    assert get("/readyz?model=nope")[0] == 404
    status, body = get("/v1/models")
    assert status == 200
    states = {m["name"]: m["state"] for m in json.loads(body)["models"]}
    assert states == {"small": "ready", "logmel": "ready"}

    async def health(service: str) -> int:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            except grpc.aio.AioRpcError as e:
                return -int(e.code().value[0])
            return int(resp.status)

    # Per model: a Health check with service = the model's name.
    serving = health_pb2.HealthCheckResponse.SERVING
    assert asyncio.run(health("small")) == serving
    assert asyncio.run(health("logmel")) == serving
    assert asyncio.run(health("nope")) == -grpc.StatusCode.NOT_FOUND.value[0]
    status, body = get("/v1/models/small")
    info = json.loads(body)
    assert status == 200 and info["input_shape"] == [3] and info["output_shape"] == [5]
    assert info["output_ratio"] == {"numerator": 1, "denominator": 2}
    assert info["input_latency"] == 4 and info["block_size"] == 2
    assert get("/v1/models/nope")[0] == 404
    assert get("/docs")[0] == 200
    assert b"sl_stream_slots" in get("/metrics")[1]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads threads from /proc")
def test_xla_computes_on_all_cpus_but_one(server: ServerProcess) -> None:
    """`sl-serve` sizes XLA's CPU pool before its backend starts (issue 16:
    a thread per CPU makes each op wait whenever Python runs)."""
    from server.app.settings import default_xla_cpu_threads

    if "PJRT_NPROC" in os.environ or "NPROC" in os.environ:
        pytest.skip("the environment sizes XLA's pool")
    tasks = Path(f"/proc/{server.proc.pid}/task")
    names = [(task / "comm").read_text().strip() for task in tasks.iterdir()]
    assert sum("XLAEigen" in name for name in names) == default_xla_cpu_threads(), names


def test_reflection_lists_services(server: ServerProcess) -> None:
    async def main() -> set[str]:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def req():  # type: ignore[no-untyped-def]
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            async for resp in stub.ServerReflectionInfo(req()):
                return {s.name for s in resp.list_services_response.service}
        return set()

    services = asyncio.run(main())
    assert "sequence_layers.serving.v1.StreamingInference" in services
    assert "grpc.health.v1.Health" in services


def test_auth_capacity_and_drain(model_dir: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text("secret\n")
    server = ServerProcess(
        [
            "--model",
            f"small={model_dir}",
            "--max-streams",
            "2",
            "--buckets",
            "2",
            "--api-key-file",
            str(key_file),
            "--drain-seconds",
            "20",
        ]
    )
    x = np.random.default_rng(9).normal(size=(40, 3)).astype(np.float32)
    try:

        async def auth_and_capacity() -> dict[str, object]:
            out: dict[str, object] = {}
            async with AsyncGrpcClient(server.grpc_target) as anonymous:
                with pytest.raises(StreamingError) as info:
                    await anonymous.infer("small", x)
                out["grpc_no_key"] = info.value.code
            async with AsyncGrpcClient(server.grpc_target, api_key="wrong") as wrong:
                with pytest.raises(StreamingError) as info:
                    await wrong.list_models()
                out["grpc_wrong_key"] = info.value.code
            out["ws_no_key"] = await _ws_error(f"{server.ws_url}/v1/models/small/stream", [])
            ok_ws = AsyncWebSocketClient(server.ws_url + "", api_key="secret")
            y, _ = await collect(ok_ws.stream("small", chunked(x, 7)))
            out["ws_with_key_frames"] = 0 if y is None else len(y)
            token_url = f"{server.ws_url}/v1/models/small/stream?token=secret"
            async with websockets.connect(token_url) as ws:
                out["ws_token"] = json.loads(await ws.recv())["type"]
            async with grpc.aio.insecure_channel(server.grpc_target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
                out["health"] = resp.status
            # Capacity: two held streams fill both slots; a third is refused.
            async with AsyncGrpcClient(server.grpc_target, api_key="secret") as client:
                hold = asyncio.Event()

                async def held():  # type: ignore[no-untyped-def]
                    yield x[:2]
                    await hold.wait()

                streams = [client.stream("small", held()) for _ in range(2)]
                for s in streams:
                    await anext(s)  # started
                with pytest.raises(StreamingError) as info:
                    await client.infer("small", x)
                out["capacity"] = info.value.code
                out["ws_capacity"] = await _ws_error(
                    f"{server.ws_url}/v1/models/small/stream?token=secret", []
                )
                hold.set()
                for s in streams:
                    async for _ in s:
                        pass
            return out

        out = asyncio.run(auth_and_capacity())
        assert out == {
            "grpc_no_key": "UNAUTHENTICATED",
            "grpc_wrong_key": "UNAUTHENTICATED",
            "ws_no_key": ("UNAUTHENTICATED", 1008),
            "ws_with_key_frames": len(offline(str(model_dir), x, tmp_path)),
            "ws_token": "started",
            "health": health_pb2.HealthCheckResponse.SERVING,
            "capacity": "RESOURCE_EXHAUSTED",
            "ws_capacity": ("RESOURCE_EXHAUSTED", 1013),
        }

        # Drain: SIGTERM while two paced streams run; they finish completely,
        # new streams are refused, readiness goes false, the process exits 0.
        async def drain() -> tuple[list[np.ndarray], str, int]:
            async with AsyncGrpcClient(server.grpc_target, api_key="secret") as client:

                async def paced():  # type: ignore[no-untyped-def]
                    for c in chunked(x, 4):
                        await asyncio.sleep(0.05)
                        yield c

                tasks = [
                    asyncio.create_task(collect(client.stream("small", paced()))) for _ in range(2)
                ]
                await asyncio.sleep(0.2)
                server.proc.send_signal(15)
                await asyncio.sleep(0.3)
                try:
                    urllib.request.urlopen(f"{server.http_url}/readyz")
                    ready_status = 200
                except urllib.error.HTTPError as e:
                    ready_status = e.code
                with pytest.raises(StreamingError) as info:
                    await client.infer("small", x)
                results = await asyncio.gather(*tasks)
                return [y for y, _ in results], info.value.code, ready_status

        outputs, refused, ready_status = asyncio.run(drain())
        expected = offline(str(model_dir), x, tmp_path)
        for y in outputs:
            np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
        assert refused == "UNAVAILABLE"
        assert ready_status == 503
        start = time.monotonic()
        assert server.proc.wait(timeout=60) == 0
        assert time.monotonic() - start < 30
    finally:
        if server.proc.poll() is None:
            server.kill()
