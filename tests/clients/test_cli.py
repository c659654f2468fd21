"""The console scripts against a real `sl-serve`: `sl-stream` (16-bit wav and
float32 npy, over gRPC and WebSocket) writes what `sl-offline` writes and
`--realtime` paces at the model's sample rate on both doors; `sl-loadtest`
writes its JSON report and PNG plot, and its capacity search finishes (the
search itself is checked against a fake load run)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtests import loadtest as lt
from server.app.cli import offline_main
from tests.server.serving import ROOT, ServerProcess, running_server

pytestmark = pytest.mark.e2e  # starts server processes: not in `make test-fast`

BIN = Path(sys.executable).parent
RATE = 16000


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server(
        ["--model", "logmel", "--max-streams", "4", "--buckets", "4", "--chunk-blocks", "4"]
    ) as s:
        yield s


def url(server: ServerProcess, door: str) -> str:
    return f"grpc://{server.grpc_target}" if door == "grpc" else server.ws_url


def script(name: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    assert (BIN / name).is_file(), f"{BIN / name} missing: reinstall with `pip install -e .`"
    return subprocess.run(
        [str(BIN / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def offline(x: np.ndarray, tmp: Path) -> np.ndarray:
    """The `sl-offline` command's own code path, in-process."""
    np.save(tmp / "offline_in.npy", x)
    assert offline_main(["logmel", str(tmp / "offline_in.npy"), str(tmp / "offline_out.npy")]) == 0
    return np.load(tmp / "offline_out.npy")


def write_wav(path: Path, pcm: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.astype("<i2").tobytes())


def tone(seconds: float, seed: int) -> np.ndarray:
    """A chirp plus noise in [-0.5, 0.5]: float32 [t]."""
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.05 * rng.normal(size=t.shape)
    return x.astype(np.float32)


def stream(*args: str) -> subprocess.CompletedProcess[str]:
    return script("sl-stream", "--model", "logmel", "--no-progress", *args)


@pytest.mark.parametrize("door", ["grpc", "ws"])
def test_sl_stream_wav_equals_offline(server: ServerProcess, door: str, tmp_path: Path) -> None:
    pcm = (tone(1.0, seed=1) * 32767).astype(np.int16)
    write_wav(tmp_path / "in.wav", pcm)
    out = tmp_path / "out.npy"
    r = stream("--url", url(server, door), str(tmp_path / "in.wav"), str(out))
    assert r.returncode == 0, r.stderr
    assert f"{len(pcm)} frames in" in r.stdout
    y = np.load(out)
    expected = offline(pcm.astype(np.float32)[:, None] / 32768, tmp_path)
    assert y.shape == expected.shape and len(y) > 0
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("door", ["grpc", "ws"])
def test_sl_stream_npy_equals_offline(server: ServerProcess, door: str, tmp_path: Path) -> None:
    x = tone(1.0, seed=2)[:, None]
    np.save(tmp_path / "in.npy", x)
    out = tmp_path / "out.npy"
    r = stream("--url", url(server, door), "--chunk-ms", "37", str(tmp_path / "in.npy"), str(out))
    assert r.returncode == 0, r.stderr
    y = np.load(out)
    expected = offline(x, tmp_path)
    assert y.shape == expected.shape and len(y) > 0
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("door", ["grpc", "ws"])
def test_sl_stream_realtime_takes_the_audio_duration(
    server: ServerProcess, door: str, tmp_path: Path
) -> None:
    seconds = 0.5
    x = tone(seconds, seed=3)[:, None]
    np.save(tmp_path / "in.npy", x)
    out = tmp_path / "out.npy"
    r = stream("--url", url(server, door), "--realtime", str(tmp_path / "in.npy"), str(out))
    assert r.returncode == 0, r.stderr
    match = re.search(r"frames out in ([0-9.]+) s", r.stdout)
    assert match is not None, r.stdout
    elapsed = float(match.group(1))
    assert seconds * 0.95 <= elapsed < seconds + 5.0, r.stdout
    np.testing.assert_allclose(np.load(out), offline(x, tmp_path), rtol=1e-4, atol=1e-4)


def test_sl_stream_missing_input_exits_2(server: ServerProcess, tmp_path: Path) -> None:
    missing = tmp_path / "nope.wav"
    r = stream("--url", url(server, "grpc"), str(missing), str(tmp_path / "out.npy"))
    assert r.returncode == 2
    assert f"{missing} does not exist" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.parametrize("door", ["grpc", "ws"])
def test_sl_stream_unknown_model_exits_1(server: ServerProcess, door: str, tmp_path: Path) -> None:
    np.save(tmp_path / "in.npy", tone(0.1, seed=4)[:, None])
    r = script(
        "sl-stream",
        "--url",
        url(server, door),
        "--model",
        "no-such-model",
        "--no-progress",
        str(tmp_path / "in.npy"),
        str(tmp_path / "out.npy"),
    )
    assert r.returncode == 1, r.stderr
    assert "NOT_FOUND" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out.npy").exists()


def loadtest(server: ServerProcess, door: str, tmp: Path, *args: str) -> dict[str, Any]:
    report = tmp / "out.json"
    r = script(
        "sl-loadtest",
        "--url",
        url(server, door),
        "--model",
        "logmel",
        "--ramp-up",
        "0.5",
        "--utterance-s",
        "1",
        "--server-chunk-blocks",
        "4",
        "--json",
        str(report),
        "--plot",
        str(tmp / "out.png"),
        *args,
        timeout=90.0,
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(report.read_text())
    assert json.loads(r.stdout) == result
    assert (tmp / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return result


def check_run(summary: dict[str, Any], streams: int, errors: bool = False) -> None:
    assert summary["streams"] == streams
    if errors:  # a capacity probe past the server's limit may see refusals
        return
    assert summary["errors"] == {}
    assert summary["utterances_ok"] == summary["utterances"] >= streams
    assert summary["throughput_audio_s_per_s"] > 0
    assert summary["real_time_factor"] > 0
    lat = summary["chunk_latency_ms"]
    assert lat["count"] > 0
    assert 0 <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


@pytest.mark.parametrize("door", ["grpc", "ws"])
def test_sl_loadtest_report_and_plot(server: ServerProcess, door: str, tmp_path: Path) -> None:
    result = loadtest(server, door, tmp_path, "--streams", "2", "--duration", "3")
    assert result["model"] == "logmel" and result["url"] == url(server, door)
    check_run(result, 2)
    # Paced in real time: 1 s utterances take about 1 s each.
    assert result["real_time_factor"] >= 0.9


def test_sl_loadtest_counts_the_windows_audio_over_the_window(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Two real-time streams (the second starts 0.25 s in) for a 3 s window,
    in 2 s utterances: 5.75 s of audio sent within it, and the second
    utterances run on until ~4.3 s. Over the window that is ~1.9 audio s/s;
    over the whole run, window and tail, it read ~1.35. A chunk counts when
    it is sent, at the time of its first sample: up to a chunk (0.16 s) a
    stream above real time."""
    result = loadtest(
        server, "ws", tmp_path, "--streams", "2", "--duration", "3", "--utterance-s", "2"
    )
    check_run(result, 2)
    assert 1.6 <= result["throughput_audio_s_per_s"] <= 2 * (3 + 0.16) / 3


def test_run_summary_throughput_is_the_windows_audio_over_the_window() -> None:
    ended_inside = lt.StreamResult([0.01], 0.01, 8.0, 8.0, None, 8.0)
    ran_past_the_end = lt.StreamResult([0.01], 0.01, 8.0, 8.0, None, 4.0)
    refused = lt.StreamResult([], None, 8.0, 0.01, "RESOURCE_EXHAUSTED")
    stats = lt.RunStats(2, [ended_inside, ran_past_the_end, refused], duration=24.0, window=20.0)
    summary = stats.summary()
    assert summary["throughput_audio_s_per_s"] == pytest.approx(12.0 / 20.0)
    assert summary["refused"] == 1


def test_sl_loadtest_lean_and_full_websocket_clients_agree(
    server: ServerProcess, tmp_path: Path
) -> None:
    """`--client lean` (loadtests/wsload.py, the default) times the same
    chunks as `--client full` (clients.client): as many per utterance, none
    of them lost."""
    runs = {
        c: loadtest(server, "ws", tmp_path, "--streams", "2", "--duration", "2", "--client", c)
        for c in ("lean", "full")
    }
    for run in runs.values():
        check_run(run, 2)
        assert run["real_time_factor"] >= 0.9
    per_utterance = {c: r["chunk_latency_ms"]["count"] / r["utterances"] for c, r in runs.items()}
    assert per_utterance["lean"] == per_utterance["full"] > 0


def test_lean_stream_reports_the_servers_refusal(server: ServerProcess) -> None:
    from loadtests.wsload import LeanClient, Plan

    info = {"output_ratio": {"numerator": 1, "denominator": 160}, "block_size": 160}
    plan = Plan(np.zeros((1600, 1), np.float32), RATE, 1600, {**info, "output_latency": 2}, 4, True)
    client = LeanClient(server.ws_url, "no-such-model", plan)
    latencies, first, error, *_ = asyncio.run(client.utterance())
    assert (latencies, first, error) == ([], None, "NOT_FOUND")


def test_sl_loadtest_capacity(server: ServerProcess, tmp_path: Path) -> None:
    result = loadtest(
        server,
        "grpc",
        tmp_path,
        "--capacity",
        "--streams",
        "1",
        "--max-streams",
        "4",
        "--duration",
        "2",
        "--target-p99-ms",
        "10000",
    )
    assert result["target_p99_ms"] == 10000
    assert result["capacity_streams"] >= 1
    sweep = result["sweep"]
    probes = [s["streams"] for s in sweep]
    assert probes[0] == 1 and max(probes) <= 4
    assert result["capacity_streams"] in probes
    for s in sweep:
        check_run(s, s["streams"], errors=s["streams"] > result["capacity_streams"])


@pytest.mark.parametrize(
    ("limit", "max_streams", "capacity", "probes"),
    [
        (5, 6, 5, [1, 2, 4, 6, 5]),  # bisects between the last good doubling and the cap
        (10, 6, 6, [1, 2, 4, 6]),  # a cap that is no power of two is still probed
        (10, 4, 4, [1, 2, 4]),
        (0, 4, 0, [1]),
    ],
)
def test_capacity_search(
    monkeypatch: pytest.MonkeyPatch,
    limit: int,
    max_streams: int,
    capacity: int,
    probes: list[int],
) -> None:
    """`find_capacity`'s search alone: runs at up to `limit` streams meet the target."""

    async def fake_run(
        args: argparse.Namespace, streams: int, progress: bool = True
    ) -> lt.RunStats:
        latency = 0.01 if streams <= limit else 1.0
        result = lt.StreamResult([latency], latency, 1.0, 1.0)
        return lt.RunStats(streams, [result], 1.0)

    monkeypatch.setattr(lt, "run_load", fake_run)
    args = argparse.Namespace(streams=1, max_streams=max_streams, target_p99_ms=100.0)
    found, sweep = asyncio.run(lt.find_capacity(args))
    assert found == capacity
    assert [s["streams"] for s in sweep] == probes
