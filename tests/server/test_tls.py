"""`sl-serve --tls-cert/--tls-key`: gRPC with TLS, WSS and HTTPS from one
self-signed certificate; a plaintext gRPC client is refused."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clients.client import (
    AsyncGrpcClient,
    AsyncWebSocketClient,
    UnavailableError,
    chunked,
    collect,
)
from server.app.cli import offline_main
from tests.server.serving import ServerProcess, running_server

pytestmark = pytest.mark.e2e  # starts server processes: not in `make test-fast`


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1: (cert.pem, key.pem)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl CLI is needed to make a self-signed certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(d / "key.pem"),
            "-out",
            str(d / "cert.pem"),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def server(cert: tuple[Path, Path]) -> Iterator[ServerProcess]:
    cert_pem, key_pem = cert
    with running_server(
        [
            "--tls-cert",
            str(cert_pem),
            "--tls-key",
            str(key_pem),
            "--model",
            "logmel",
            "--max-streams",
            "2",
            "--buckets",
            "2",
        ]
    ) as s:
        yield s


@pytest.fixture(scope="module")
def wave() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(size=(4000, 1)) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def expected(wave: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """`sl-offline logmel` on `wave`, in-process."""
    d = tmp_path_factory.mktemp("offline")
    np.save(d / "in.npy", wave)
    assert offline_main(["logmel", str(d / "in.npy"), str(d / "out.npy")]) == 0
    return np.load(d / "out.npy")


def trusting(cert_pem: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert_pem))


def test_grpc_over_tls_equals_offline(
    server: ServerProcess, cert: tuple[Path, Path], wave: np.ndarray, expected: np.ndarray
) -> None:
    async def main() -> np.ndarray | None:
        async with AsyncGrpcClient(
            f"localhost:{server.grpc_port}", root_certificates=cert[0].read_bytes()
        ) as client:
            assert [m["name"] for m in await client.list_models()] == ["logmel"]
            y, ended = await collect(client.stream("logmel", chunked(wave, 700)))
            assert ended is not None and ended.frames_in == len(wave)
            return y

    y = asyncio.run(main())
    assert y is not None and len(y) > 0
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_plaintext_grpc_is_refused(server: ServerProcess, wave: np.ndarray) -> None:
    async def main() -> None:
        async with AsyncGrpcClient(server.grpc_target) as client:
            with pytest.raises(UnavailableError):
                await client.list_models()
            with pytest.raises(UnavailableError):
                await collect(client.stream("logmel", chunked(wave, 700)))

    asyncio.run(main())


def test_wss_equals_offline(
    server: ServerProcess, cert: tuple[Path, Path], wave: np.ndarray, expected: np.ndarray
) -> None:
    async def main() -> np.ndarray | None:
        client = AsyncWebSocketClient(f"wss://localhost:{server.http_port}", ssl=trusting(cert[0]))
        y, ended = await collect(client.stream("logmel", chunked(wave, 700)))
        assert ended is not None and ended.frames_in == len(wave)
        return y

    y = asyncio.run(main())
    assert y is not None
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_wss_without_trusting_the_cert_fails(server: ServerProcess, wave: np.ndarray) -> None:
    async def main() -> None:
        client = AsyncWebSocketClient(
            f"wss://localhost:{server.http_port}", ssl=ssl.create_default_context()
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            await collect(client.stream("logmel", chunked(wave, 700)))

    asyncio.run(main())


def test_https_healthz_and_models(server: ServerProcess, cert: tuple[Path, Path]) -> None:
    ctx = trusting(cert[0])
    for host in ("localhost", "127.0.0.1"):
        base = f"https://{host}:{server.http_port}"
        with urllib.request.urlopen(f"{base}/healthz", context=ctx, timeout=10) as r:
            assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
        with urllib.request.urlopen(f"{base}/readyz", context=ctx, timeout=10) as r:
            assert json.loads(r.read()) == {"status": "ready", "models": {"logmel": "ready"}}
    with urllib.request.urlopen(
        f"https://127.0.0.1:{server.http_port}/v1/models", context=ctx, timeout=10
    ) as r:
        assert [m["name"] for m in json.loads(r.read())["models"]] == ["logmel"]


@pytest.mark.parametrize("scheme", ["grpcs", "wss"])
def test_sl_stream_trusts_a_ca_cert(
    server: ServerProcess,
    cert: tuple[Path, Path],
    wave: np.ndarray,
    expected: np.ndarray,
    tmp_path: Path,
    scheme: str,
) -> None:
    import sys

    np.save(tmp_path / "in.npy", wave)
    port = server.grpc_port if scheme == "grpcs" else server.http_port
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "sl-stream"),
            "--url",
            f"{scheme}://localhost:{port}",
            "--model",
            "logmel",
            "--ca-cert",
            str(cert[0]),
            "--no-progress",
            str(tmp_path / "in.npy"),
            str(tmp_path / "out.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-5)
