"""The HTTP door's admin drain call at the ASGI boundary (no sockets, no
server): who may call it, what it answers, and that it starts the process's
one drain (`server.app.serve.Drain`) exactly as SIGTERM does. The call going
through a real `sl-serve` that then moves its streams is in
tests/server/test_migration_e2e.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from server.app.serve import Drain
from server.errors import PermissionDenied, Unauthenticated
from server.frontdoors.auth import AdminAccess, ApiKeys, is_loopback
from server.frontdoors.http import DRAIN_PATH, create_app
from tests.server.frontdoors.fakes import FakeRuntime

REMOTE = ("10.1.2.3", 40000)
LOOPBACK = ("127.0.0.1", 40000)


class DrainableRuntime(FakeRuntime):
    """A fake runtime with the two things `Drain` uses."""

    def __init__(self) -> None:
        super().__init__()
        self.active_streams = 3
        self.drain_calls = 0

    def drain(self) -> None:
        self.drain_calls += 1
        self.draining = True


def request(
    app: Any,
    method: str,
    path: str,
    query: str = "",
    authorization: str | None = None,
    client: tuple[str, int] | None = LOOPBACK,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request through the ASGI app: (status, headers, JSON body)."""
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": headers,
        "client": client,
        "server": ("127.0.0.1", 8080),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=10))
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    response_headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], response_headers, json.loads(body) if body else None


def drain_app(
    admin_keys: tuple[str, ...] = (), api_keys: tuple[str, ...] = ()
) -> tuple[Any, DrainableRuntime, Drain]:
    runtime = DrainableRuntime()
    drain = Drain(runtime, grace_s=10.0)  # type: ignore[arg-type]
    app = create_app(runtime, ApiKeys(api_keys), drainer=drain, admin=AdminAccess(admin_keys))
    return app, runtime, drain


def test_drain_starts_once_and_answers_every_call() -> None:
    app, runtime, drain = drain_app()
    status, _, body = request(app, "POST", DRAIN_PATH, "grace_s=0")
    assert (status, body) == (202, {"draining": True, "streams": 3, "grace_s": 0.0})
    assert drain.requested.is_set() and runtime.drain_calls == 1
    # Readiness is false once the call has returned, not when the drain loop wakes.
    assert request(app, "GET", "/readyz")[0] == 503
    # A second call, or SIGTERM (the handler calls `start()`), is not a second drain.
    runtime.active_streams = 1
    status, _, body = request(app, "POST", DRAIN_PATH, "grace_s=30")
    assert (status, body) == (202, {"draining": True, "streams": 1, "grace_s": 0.0})
    assert drain.start().grace_s == 0.0
    assert runtime.drain_calls == 1


def test_drain_without_grace_uses_drain_seconds() -> None:
    app, _, drain = drain_app()
    status, _, body = request(app, "POST", DRAIN_PATH)
    assert (status, body["grace_s"]) == (202, 10.0)
    assert drain.grace_s == 10.0


@pytest.mark.parametrize("grace", ["-1", "nan", "inf", "soon"])
def test_a_bad_grace_period_is_refused_and_starts_nothing(grace: str) -> None:
    app, runtime, drain = drain_app()
    status, _, _ = request(app, "POST", DRAIN_PATH, f"grace_s={grace}")
    assert status == 422
    assert not drain.requested.is_set() and runtime.drain_calls == 0


@pytest.mark.parametrize(
    ("authorization", "client", "status"),
    [
        ("Bearer admin-1", REMOTE, 202),  # an admin key works from anywhere
        ("Bearer  admin-2 ", REMOTE, 202),
        (None, LOOPBACK, 401),  # keys configured: loopback needs one too
        ("Bearer nope", REMOTE, 401),
        ("Bearer client", LOOPBACK, 401),  # an API key is not an admin key
        ("admin-1", LOOPBACK, 401),  # not a Bearer header
    ],
)
def test_admin_keys_decide_when_configured(
    authorization: str | None, client: tuple[str, int], status: int
) -> None:
    app, runtime, drain = drain_app(admin_keys=("admin-1", "admin-2"), api_keys=("client",))
    got, headers, body = request(app, "POST", DRAIN_PATH, "grace_s=1", authorization, client)
    assert got == status
    assert drain.requested.is_set() is (status == 202)
    if status == 401:
        assert body["code"] == "UNAUTHENTICATED" and "admin key" in body["message"]
        assert headers["www-authenticate"] == "Bearer"
        assert runtime.drain_calls == 0


@pytest.mark.parametrize(
    ("client", "authorization", "status"),
    [
        (LOOPBACK, None, 202),
        (("::1", 1), None, 202),
        (REMOTE, None, 403),
        (REMOTE, "Bearer client", 403),  # a client's API key grants nothing here
        (None, None, 403),  # no peer address (a Unix socket): not known to be local
    ],
)
def test_without_admin_keys_only_loopback_may_drain(
    client: tuple[str, int] | None, authorization: str | None, status: int
) -> None:
    app, _, drain = drain_app(api_keys=("client",))
    got, _, body = request(app, "POST", DRAIN_PATH, "", authorization, client)
    assert got == status
    assert drain.requested.is_set() is (status == 202)
    if status == 403:
        assert body["code"] == "PERMISSION_DENIED" and "--admin-key-file" in body["message"]


def test_the_drain_call_is_in_the_openapi_schema() -> None:
    app, _, _ = drain_app()
    status, _, schema = request(app, "GET", "/openapi.json")
    assert status == 200
    operation = schema["paths"][DRAIN_PATH]["post"]
    assert {"202", "401", "403"} <= set(operation["responses"])
    (grace,) = [p for p in operation["parameters"] if p["name"] == "grace_s"]
    assert grace["in"] == "query" and not grace.get("required", False)
    # No drain control (an app built without one): no route, nothing to call.
    bare = create_app(DrainableRuntime())
    assert request(bare, "POST", DRAIN_PATH)[0] in (404, 405)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.0.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("0.0.0.0", False),
        ("localhost", False),  # a name: not resolved, refused
        ("testclient", False),
        ("", False),
        (None, False),
    ],
)
def test_loopback_addresses(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_admin_access_errors_say_what_to_do() -> None:
    with pytest.raises(Unauthenticated, match="API keys do not grant admin"):
        AdminAccess(["k"]).check("Bearer x", client_host="127.0.0.1")
    with pytest.raises(PermissionDenied, match=r"10\.0\.0\.7"):
        AdminAccess().check(None, client_host="10.0.0.7")
    AdminAccess(["k"]).check("Bearer k", client_host=None)  # passes
