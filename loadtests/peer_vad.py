"""The peer for the Silero VAD benchmark: what users run today.

A FastAPI WebSocket server in which every stream gets its own ONNX Runtime
session (one thread, as the official `OnnxWrapper` configures it) and its
own LSTM state and context, and runs the official per-window loop: 64
samples of context + 512 new samples in, one probability and the new state
out, window after window. It speaks our WebSocket protocol (started, binary
float32 in and out, end/ended; `GET /v1/models`) so the same load generator
(`sl-loadtest`) drives it and `sl-serve`.

    python -m loadtests.peer_vad --port 8090      # wheel from build/ (make silero-vad)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

WINDOW, CONTEXT, RATE = 512, 64, 16000
ONNX_MEMBER = "silero_vad/data/silero_vad.onnx"  # the stock streaming model

INFO: dict[str, Any] = {
    "name": "silero-vad",
    "description": "Silero VAD in ONNX Runtime, one session per stream (the peer).",
    "input_shape": [1],
    "input_dtype": "float32",
    "output_shape": [1],
    "output_dtype": "float32",
    "sample_rate": RATE,
    "block_size": WINDOW,
    "output_ratio": {"numerator": 1, "denominator": WINDOW},
    "input_latency": WINDOW - 1,
    "output_latency": 0,
    "max_streams": 0,
    "speech_segments": False,
}


class OfficialStream:
    """One stream as `OnnxWrapper.__call__` runs it, without torch."""

    def __init__(self, model: bytes) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            model, sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.state = np.zeros((2, 1, 128), np.float32)
        self.context = np.zeros((1, CONTEXT), np.float32)
        self.sr = np.array(RATE, np.int64)
        self.pending = np.zeros(0, np.float32)

    def push(self, samples: np.ndarray, final: bool = False) -> np.ndarray:
        """Probabilities of the whole windows now available (the last partial
        window zero-padded when `final`)."""
        x = np.concatenate([self.pending, samples])
        if final and len(x) % WINDOW:
            x = np.pad(x, (0, -len(x) % WINDOW))
        whole = len(x) // WINDOW * WINDOW
        self.pending = x[whole:]
        probs = []
        for i in range(0, whole, WINDOW):
            window = np.concatenate([self.context, x[None, i : i + WINDOW]], axis=1)
            out, self.state = self.session.run(
                None, {"input": window, "state": self.state, "sr": self.sr}
            )
            self.context = window[:, -CONTEXT:]
            probs.append(out[0, 0])
        return np.asarray(probs, np.float32).reshape(-1, 1)


def create_app(wheel: Path) -> FastAPI:
    with zipfile.ZipFile(wheel) as z:
        model = z.read(ONNX_MEMBER)
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"models": [INFO]}

    @app.websocket("/v1/models/{name}/stream")
    async def stream(websocket: WebSocket, name: str) -> None:
        await websocket.accept()
        # Building a session takes ~70 ms here: in a thread, so the streams
        # already running keep their latency.
        vad = await asyncio.to_thread(OfficialStream, model)
        started = time.monotonic()
        frames_in = frames_out = 0
        stream_id = uuid.uuid4().hex
        await websocket.send_text(json.dumps({"type": "started", **INFO, "stream_id": stream_id}))
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes")
                final = data is None
                samples = np.frombuffer(data, "<f4") if data else np.zeros(0, np.float32)
                frames_in += len(samples)
                probs = vad.push(samples, final=final)
                if len(probs):
                    frames_out += len(probs)
                    await websocket.send_bytes(probs.astype("<f4").tobytes())
                if final:
                    ended = {"type": "ended", "frames_in": frames_in, "frames_out": frames_out}
                    ended.update(ticks=0, duration_seconds=time.monotonic() - started)
                    await websocket.send_text(json.dumps(ended))
                    await websocket.close(1000)
                    return
        except WebSocketDisconnect:
            return

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="peer_vad", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    root = Path(__file__).resolve().parents[1]
    p.add_argument("--wheel", default=str(root / "build" / "silero_vad-6.2.3-py3-none-any.whl"))
    args = p.parse_args(argv)
    uvicorn.run(create_app(Path(args.wheel)), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
