"""The browser client in headless Chromium: a fake microphone (a wav the
test writes) streams through the page's AudioWorklet and WebSocket to a real
`sl-serve`; the page's received frame count must equal what the server sent.
A screenshot is kept under artifacts/."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest
import websockets

from tests.server.serving import ROOT, free_port, running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.e2e,  # starts a server and a browser: not in `make test-fast`
    pytest.mark.skipif(
        CHROMIUM is None, reason="chromium is not installed (make test installs it as root)"
    ),
]


def write_wav(path: Path, seconds: float, rate: int = 16000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    chirp = 0.3 * np.sin(2 * np.pi * (200 + 1500 * t / seconds) * t)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((chirp * 32767).astype("<i2").tobytes())


async def _evaluate(ws: websockets.ClientConnection, expression: str, ids: list[int]) -> object:
    ids[0] += 1
    await ws.send(
        json.dumps(
            {
                "id": ids[0],
                "method": "Runtime.evaluate",
                "params": {"expression": expression, "returnByValue": True},
            }
        )
    )
    while True:
        msg = json.loads(await ws.recv())
        if msg.get("id") == ids[0]:
            return msg["result"]["result"].get("value")


async def drive_page(debug_port: int, artifact: Path) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while True:
        try:
            pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json").read())
            page = next(p for p in pages if p["type"] == "page")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    async with websockets.connect(page["webSocketDebuggerUrl"], max_size=2**26) as ws:
        ids = [0]
        state: dict[str, object] = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            status = await _evaluate(ws, "document.body.dataset.status || ''", ids)
            if status in ("ended", "error", "closed"):
                break
            await asyncio.sleep(0.25)
        state["status"] = status
        state["error"] = await _evaluate(ws, "document.body.dataset.error || ''", ids)
        state["frames"] = int(
            await _evaluate(ws, "document.getElementById('frames').dataset.count", ids)
        )
        state["server_frames"] = int(
            await _evaluate(ws, "document.getElementById('server-frames').dataset.count", ids)
        )
        state["sent"] = int(
            await _evaluate(ws, "document.getElementById('sent').dataset.count", ids)
        )
        state["moves"] = int(
            await _evaluate(ws, "document.getElementById('moves').dataset.count", ids)
        )
        state["vad_shown"] = await _evaluate(ws, "!document.getElementById('vad').hidden", ids)
        state["segments"] = int(
            await _evaluate(ws, "document.getElementById('segment-count').dataset.count", ids)
        )
        state["probability"] = await _evaluate(
            ws, "document.getElementById('prob-now').textContent", ids
        )
        ids[0] += 1
        await ws.send(
            json.dumps(
                {"id": ids[0], "method": "Page.captureScreenshot", "params": {"format": "png"}}
            )
        )
        while True:
            msg = json.loads(await ws.recv())
            if msg.get("id") == ids[0]:
                artifact.write_bytes(base64.b64decode(msg["result"]["data"]))
                break
        return state


def test_browser_streams_microphone_and_shows_frames(tmp_path: Path) -> None:
    wav = tmp_path / "speech.wav"
    write_wav(wav, 3.0)
    state = _run_page(["--model", "logmel"], "logmel", wav, 2, "browser.png")
    assert state["status"] == "ended", state
    assert state["sent"] > 16000  # about 2 s of 16 kHz audio reached the server
    assert state["frames"] > 0
    assert state["frames"] == state["server_frames"], state
    assert state["vad_shown"] is False and state["segments"] == 0


def test_browser_shows_speech_probability_and_segments(tmp_path: Path) -> None:
    from server import silero_vad
    from tests.server.vad_audio import speech_mix, wheel_or_skip

    directory = silero_vad.import_to(tmp_path / "vad", str(wheel_or_skip()))
    x = speech_mix(0)[: 6 * 16000]
    wav = tmp_path / "speech.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    state = _run_page(["--model", f"silero-vad={directory}"], "silero-vad", wav, 6, "vad.png")
    assert state["status"] == "ended", state
    assert state["frames"] == state["server_frames"] > 100, state
    assert state["vad_shown"] is True
    assert state["segments"] >= 1, state  # espeak-ng speech was detected live
    assert 0.0 <= float(str(state["probability"])) <= 1.0


def test_browser_follows_a_moved_stream(tmp_path: Path) -> None:
    """The page against a fake replica (tests/clients/fake_servers.py) that
    hands the stream off after 1 s of audio and takes it back on the page's
    reconnect: every captured frame reaches the server exactly once (its
    frame count equals the page's), and the page shows exactly the outputs
    the server made (none repeated, none missing)."""
    from tests.clients.fake_servers import Behaviour, replicas

    wav = tmp_path / "speech.wav"
    write_wav(wav, 4.0)
    replica = Behaviour(move_after=16000, check_values=False)
    with replicas(replica) as fakes:
        http_url = fakes.ws_urls[0].replace("ws://", "http://")
        state = _browse(http_url, "fake", wav, 3, "browser-moved.png")
    log = replica.log
    assert state["status"] == "ended", (state, log)
    assert state["moves"] == 1
    moved = next(e["moved"] for e in log if "moved" in e)
    assert {"resumed": moved, "emitted": moved - 2} in log  # the fake steps whole chunks of 4
    assert {"token_in": "query"} in log
    ended = next(e["ended"] for e in log if "ended" in e)
    assert ended == state["sent"] > moved  # all audio, once: no gap, no duplicate
    assert state["frames"] == state["server_frames"] == ended - 2


def _run_page(
    model_args: list[str], model: str, wav: Path, seconds: int, screenshot: str
) -> dict[str, object]:
    with running_server([*model_args, "--max-streams", "2", "--buckets", "2"]) as server:
        return _browse(server.http_url, model, wav, seconds, screenshot)


def _browse(
    http_url: str, model: str, wav: Path, seconds: int, screenshot: str
) -> dict[str, object]:
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    debug_port = free_port()
    profile = tempfile.mkdtemp(prefix="chromium-")
    url = f"{http_url}/?model={model}&autostart=1&seconds={seconds}"
    browser = subprocess.Popen(
        [
            str(CHROMIUM),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--autoplay-policy=no-user-gesture-required",
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}",
            f"--remote-debugging-port={debug_port}",
            f"--user-data-dir={profile}",
            "--window-size=900,600",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        state = asyncio.run(drive_page(debug_port, artifacts / screenshot))
    finally:
        browser.kill()
        browser.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)
    assert (artifacts / screenshot).stat().st_size > 1000
    return state
