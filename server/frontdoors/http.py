"""The HTTP front door (FastAPI on uvicorn): health, readiness, metrics, model
listing, the admin drain call, OpenAPI docs, the browser client, and the
WebSocket stream route (`server.frontdoors.websocket`), all on one port.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.routing import WebSocketRoute

from server.errors import PermissionDenied, StreamError, Unauthenticated
from server.frontdoors.auth import HEADER_HINT, AdminAccess, ApiKeys
from server.frontdoors.bridge import StreamRuntime
from server.frontdoors.websocket import WebSocketStream, error_body
from server.model import ModelInfo
from server.stats import ErrorStats

WEB_DIR = Path(__file__).resolve().parents[2] / "clients" / "web"
STREAM_PATH = "/v1/models/{model}/stream"
DRAIN_PATH = "/v1/admin/drain"


@dataclasses.dataclass(frozen=True)
class DrainStatus:
    """The drain under way, as `Drainer.start` reports it."""

    streams: int  # streams open when the call came
    grace_s: float  # the grace period of the drain (of the first call, if it was earlier)


class Drainer(Protocol):
    """The process's one drain (SIGTERM does the same, see server/app/serve.py)."""

    def start(self, grace_s: float | None = None) -> DrainStatus:
        """Starts draining with `grace_s` (None: `--drain-seconds`); once
        started, later calls change nothing and report the drain under way."""
        ...


class DrainAccepted(BaseModel):
    """`POST /v1/admin/drain`'s answer (202)."""

    draining: bool
    streams: int
    grace_s: float


def create_app(
    runtime: StreamRuntime,
    api_keys: ApiKeys | None = None,
    metrics: Callable[[], tuple[bytes, str]] | None = None,
    max_message_bytes: int = 16 * 1024 * 1024,
    *,
    drainer: Drainer | None = None,
    admin: AdminAccess | None = None,
) -> FastAPI:
    """The FastAPI app serving `runtime`. `metrics()` returns (body, content
    type). With `drainer`, `POST /v1/admin/drain` starts the drain, for the
    callers `admin` allows (default: loopback only)."""
    app = FastAPI(
        title="sequence-layers-serving",
        description="Streaming inference for SequenceLayers models. Streams go over "
        f"WebSocket (`{STREAM_PATH}`) or gRPC.",
        version="1",
    )
    keys = api_keys or ApiKeys()

    def model_json(info: ModelInfo) -> dict[str, Any]:
        # `state` (compiling, ready, draining) is live, so not part of ModelInfo.
        return {**info.to_json(), "state": runtime.model_state(info.name)}

    def refuse(error: StreamError, status_code: int, model: str = "") -> JSONResponse:
        runtime.record(ErrorStats(model, error.code, "http"))
        return JSONResponse(error_body(error), status_code=status_code)

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

    def unauthorized(request: Request) -> Response | None:
        """The 401 response for a request without a valid key, else None."""
        try:
            keys.check(
                request.headers.get("authorization"),
                request.query_params.get("token"),
                how=HEADER_HINT,
            )
        except StreamError as e:
            return refuse(e, 401)
        return None

    @app.get("/v1/models", summary="The models this server streams")
    async def list_models(request: Request) -> Response:
        if (refused := unauthorized(request)) is not None:
            return refused
        return JSONResponse({"models": [model_json(i) for i in runtime.list_models()]})

    @app.get("/v1/models/{model}", summary="One model's streaming parameters")
    async def get_model(model: str, request: Request) -> Response:
        if (refused := unauthorized(request)) is not None:
            return refused
        try:
            return JSONResponse(model_json(runtime.get_model(model)))
        except StreamError as e:
            return refuse(e, 404, model)

    if drainer is not None:
        access = admin or AdminAccess()

        @app.post(
            DRAIN_PATH,
            status_code=202,
            response_model=DrainAccepted,
            summary="Drain this server, as SIGTERM does",
            description="Readiness turns false and new streams are refused; streams in flight "
            "get the grace period to finish, then each one still open moves to another replica "
            "with a resume token (with `--resume-key-file`) or ends with UNAVAILABLE; then the "
            "process exits 0. Calls while a drain is under way answer 202 and change nothing. "
            "Auth: `Authorization: Bearer KEY` with a key of `--admin-key-file` (API keys do not "
            "grant admin); without admin keys, loopback clients only.",
            responses={
                401: {"description": "missing or wrong admin key"},
                403: {"description": "no admin keys configured and the client is not on loopback"},
            },
        )
        async def admin_drain(
            request: Request,
            grace_s: Annotated[
                float | None,
                Query(
                    ge=0,
                    allow_inf_nan=False,
                    description="grace period for this drain in seconds (default "
                    "`--drain-seconds`; 0: streams move at once)",
                ),
            ] = None,
        ) -> Response:
            try:
                access.check(
                    request.headers.get("authorization"),
                    client_host=request.client.host if request.client else None,
                )
            except Unauthenticated as e:
                refused = refuse(e, 401)
                refused.headers["WWW-Authenticate"] = "Bearer"
                return refused
            except PermissionDenied as e:
                return refuse(e, 403)
            status = drainer.start(grace_s)
            body = DrainAccepted(draining=True, streams=status.streams, grace_s=status.grace_s)
            return JSONResponse(body.model_dump(), status_code=202)

    # A raw ASGI endpoint (see server/frontdoors/websocket.py for why).
    endpoint = WebSocketStream(runtime, keys, max_message_bytes)
    app.router.routes.append(WebSocketRoute(STREAM_PATH, endpoint, name="stream"))

    if WEB_DIR.is_dir():
        app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(WEB_DIR / "index.html")

    return app
