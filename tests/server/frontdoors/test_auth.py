"""The API-key check both doors share."""

from __future__ import annotations

import pytest

from server.errors import Unauthenticated
from server.frontdoors.auth import GRPC_HINT, WEBSOCKET_HINT, ApiKeys


def test_off_without_keys() -> None:
    keys = ApiKeys()
    assert not keys.enabled
    assert keys.allows(None)
    keys.check(None, how=GRPC_HINT)  # does not raise


@pytest.mark.parametrize(
    ("authorization", "token", "allowed"),
    [
        ("Bearer k2", None, True),
        (b"Bearer k1", None, True),  # gRPC metadata may be bytes
        ("Bearer  k1 ", None, True),
        ("Bearer k3", None, False),
        ("bearer k1", None, False),
        ("k1", None, False),
        ("Bearer ", None, False),
        (None, "k1", True),  # browsers: ?token=
        (None, "k3", False),
        ("Basic abc", "k1", True),  # not a Bearer header: the token decides
        ("Bearer k3", "k1", False),  # a Bearer header decides
        (None, None, False),
        ("", "", False),
    ],
)
def test_bearer_header_or_token(
    authorization: str | bytes | None, token: str | None, allowed: bool
) -> None:
    assert ApiKeys(["k1", "k2"]).allows(authorization, token) is allowed


def test_check_says_how_to_send_the_key() -> None:
    keys = ApiKeys(["k1"])
    assert keys.enabled
    with pytest.raises(Unauthenticated) as info:
        keys.check("Bearer nope", how=WEBSOCKET_HINT)
    assert info.value.code == "UNAUTHENTICATED"
    assert info.value.message == (
        "missing or wrong API key: send `Authorization: Bearer <key>` or `?token=<key>`."
    )
    keys.check("Bearer k1", how=WEBSOCKET_HINT)
