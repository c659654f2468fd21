"""The HTTP front door (FastAPI on uvicorn): the WebSocket stream protocol,
health, readiness, metrics, model listing, OpenAPI docs and the browser client.

WebSocket protocol (pinned), `ws://HOST:PORT/v1/models/{model}/stream?dtype=float32|int16`:
server sends a text `{"type": "started", ...ModelInfo, "stream_id"}`; the client
sends binary little-endian frames `[frames, *C]` and a text `{"type": "end"}`;
the server sends each output as binary float32 `[frames, *C]`, then text
`{"type": "ended", ...}` and closes with 1000. Errors: text `{"type": "error",
"code", "message"}` then a close code from `server.wire.WS_CLOSE_CODES`.

Speech segments (models with `speech_segments`, e.g. silero-vad): add
`&speech_segments=1` and optionally `threshold`, `neg_threshold`,
`min_silence_duration_ms`, `speech_pad_ms` to the URL; after the output that
causes them the server sends text `{"type": "speech_started", "sample": N}`
and `{"type": "speech_stopped", "sample": N}` (input samples from the
stream's start). Clients that do not ask get none.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles

from server.errors import InvalidArgument, StreamError, Unauthenticated
from server.model import ModelInfo
from server.runtime import Runtime
from server.segments import SpeechEvent
from server.session import Ended, Output, Session
from server.stats import ChunkStats, ErrorStats
from server.wire import decode_ws_frames, segment_options_from_query, ws_close_code

WEB_DIR = Path(__file__).resolve().parents[1] / "clients" / "web"


def create_app(
    runtime: Runtime,
    api_keys: list[str] | None = None,
    metrics: Callable[[], tuple[bytes, str]] | None = None,
    max_message_bytes: int = 16 * 1024 * 1024,
) -> FastAPI:
    """The FastAPI app serving `runtime`. `metrics()` returns (body, content type)."""
    app = FastAPI(
        title="sequence-layers-serving",
        description="Streaming inference for SequenceLayers models. Streams go over "
        "WebSocket (`/v1/models/{model}/stream`) or gRPC.",
        version="1",
    )
    keys = [k.encode() for k in (api_keys or [])]

    def report(error: StreamError, transport: str, model: str = "") -> None:
        runtime.record(ErrorStats(model, error.code, transport))

    def authorized(header: str | None, token: str | None) -> bool:
        if not keys:
            return True
        candidate = None
        if header and header.startswith("Bearer "):
            candidate = header[len("Bearer ") :].strip()
        elif token:
            candidate = token
        return candidate is not None and any(
            hmac.compare_digest(candidate.encode(), k) for k in keys
        )

    def model_json(info: ModelInfo) -> dict[str, Any]:
        # `state` (compiling, ready, draining) is live, so not part of ModelInfo.
        return {**info.to_json(), "state": runtime.model_state(info.name)}

    def error_body(error: StreamError) -> dict[str, str]:
        return {"type": "error", "code": error.code, "message": error.message}

    @app.get("/healthz", summary="Liveness: the process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness: every model compiled and not draining; `?model=NAME` asks "
        "about one model, which serves as soon as its own programs are compiled",
    )
    async def readyz(model: str | None = None) -> Response:
        states = {info.name: runtime.model_state(info.name) for info in runtime.list_models()}
        if model is not None:
            if model not in states:
                return JSONResponse({"status": "unknown model", "model": model}, status_code=404)
            ok = states[model] == "ready"
            return JSONResponse({"status": states[model]}, status_code=200 if ok else 503)
        if runtime.ready:
            return JSONResponse({"status": "ready", "models": states})
        status = "draining" if runtime.draining else "starting"
        return JSONResponse({"status": status, "models": states}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics_endpoint() -> Response:
        if metrics is None:
            return PlainTextResponse("", status_code=404)
        body, content_type = metrics()
        return Response(body, media_type=content_type)

    def check_http_auth(request: Request) -> JSONResponse | None:
        if authorized(request.headers.get("authorization"), request.query_params.get("token")):
            return None
        error = Unauthenticated("missing or wrong API key: send `Authorization: Bearer <key>`.")
        report(error, "http")
        return JSONResponse(error_body(error), status_code=401)

    @app.get("/v1/models", summary="The models this server streams")
    async def list_models(request: Request) -> Response:
        if denied := check_http_auth(request):
            return denied
        return JSONResponse({"models": [model_json(i) for i in runtime.list_models()]})

    @app.get("/v1/models/{model}", summary="One model's streaming parameters")
    async def get_model(model: str, request: Request) -> Response:
        if denied := check_http_auth(request):
            return denied
        try:
            return JSONResponse(model_json(runtime.get_model(model)))
        except StreamError as e:
            report(e, "http", model)
            return JSONResponse(error_body(e), status_code=404)

    @app.websocket("/v1/models/{model}/stream")
    async def stream(websocket: WebSocket, model: str) -> None:
        await websocket.accept()
        session: Session | None = None
        reader: asyncio.Task[None] | None = None
        started = time.monotonic()
        try:
            if not authorized(
                websocket.headers.get("authorization"), websocket.query_params.get("token")
            ):
                raise Unauthenticated(
                    "missing or wrong API key: send `Authorization: Bearer <key>` "
                    "or `?token=<key>`."
                )
            dtype = websocket.query_params.get("dtype", "float32")
            if dtype not in ("float32", "int16"):
                raise InvalidArgument(f"dtype={dtype!r} is not supported; use float32 or int16.")
            session = runtime.open_stream(model, websocket.query_params.get("stream_id"))
            segments = segment_options_from_query(websocket.query_params)
            if segments is not None:
                session.request_segments(segments)
            info = session.info
            await websocket.send_text(
                json.dumps({"type": "started", **info.to_json(), "stream_id": session.stream_id})
            )
            reader = asyncio.create_task(
                _read_ws(websocket, session, dtype, info.input_shape, max_message_bytes)
            )
            async for item in session.outputs():
                if isinstance(item, Output):
                    await websocket.send_bytes(item.frames.astype("<f4").tobytes())
                    runtime.record(
                        ChunkStats(
                            model,
                            "websocket",
                            time.monotonic() - item.received_at,
                            item.frames.shape[0],
                        )
                    )
                elif isinstance(item, SpeechEvent):
                    await websocket.send_text(
                        json.dumps({"type": item.kind, "sample": item.sample})
                    )
                elif isinstance(item, Ended):
                    await websocket.send_text(
                        json.dumps(
                            {
                                "type": "ended",
                                "frames_in": item.frames_in,
                                "frames_out": item.frames_out,
                                "ticks": item.ticks,
                                "duration_seconds": time.monotonic() - started,
                            }
                        )
                    )
                    await websocket.close(1000)
        except StreamError as e:
            report(e, "websocket", model)
            with contextlib.suppress(Exception):
                await websocket.send_text(json.dumps(error_body(e)))
                await websocket.close(ws_close_code(e), reason=e.message[:120])
        except WebSocketDisconnect:
            pass
        finally:
            if reader is not None:
                reader.cancel()
            if session is not None:
                session.cancel()

    if WEB_DIR.is_dir():
        app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(WEB_DIR / "index.html")

    return app


async def _read_ws(
    websocket: WebSocket,
    session: Session,
    dtype: str,
    channel_shape: tuple[int, ...],
    max_message_bytes: int,
) -> None:
    """Feeds client messages into the session until `end` or disconnect."""
    try:
        while True:
            message: dict[str, Any] = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                session.cancel()
                return
            data = message.get("bytes")
            if data is not None:
                if len(data) > max_message_bytes:
                    from server.errors import ResourceExhausted

                    raise ResourceExhausted(
                        f"message of {len(data)} bytes exceeds {max_message_bytes}; "
                        "send smaller chunks."
                    )
                session.send(decode_ws_frames(data, dtype, channel_shape))
                continue
            text = message.get("text") or ""
            try:
                control = json.loads(text)
            except json.JSONDecodeError:
                raise InvalidArgument(
                    'text messages must be JSON, e.g. {"type": "end"}; send samples as binary.'
                ) from None
            if isinstance(control, dict) and control.get("type") == "end":
                session.end()
                return
            raise InvalidArgument(
                f'unknown control message {text[:80]!r}; expected {{"type": "end"}}.'
            )
    except StreamError as e:
        session.fail(e)
    except asyncio.CancelledError:
        raise
    except Exception:
        session.cancel()
