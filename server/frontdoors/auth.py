"""The API-key check both front doors use.

Off when no key is configured. On, a request carries the key as
`Authorization: Bearer KEY` (gRPC metadata `authorization`, an HTTP or
WebSocket header) or, where browsers cannot set headers, as `?token=KEY`.
Keys compare in constant time, so response timing does not reveal a prefix.

Example:
    keys = ApiKeys(["s3cret"])
    keys.check("Bearer s3cret", how=HEADER_HINT)      # passes
    keys.check(None, token="nope", how=HEADER_HINT)   # raises Unauthenticated
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from server.errors import Unauthenticated

_BEARER = b"Bearer "

# How each door tells a client to send its key (the error message says it).
GRPC_HINT = "send metadata `authorization: Bearer <key>`"
HEADER_HINT = "send `Authorization: Bearer <key>`"
WEBSOCKET_HINT = "send `Authorization: Bearer <key>` or `?token=<key>`"


class ApiKeys:
    """The configured API keys; an empty set turns auth off."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = tuple(k.encode() for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | bytes | None, token: str | None = None) -> bool:
        """True if auth is off, or the `Bearer` header (else the token) is a key."""
        if not self._keys:
            return True
        if isinstance(authorization, str):
            authorization = authorization.encode()
        if authorization and authorization.startswith(_BEARER):
            candidate = authorization[len(_BEARER) :].strip()
        elif token:
            candidate = token.encode()
        else:
            return False
        # Every key is compared (no early exit), so timing does not say which matched.
        matches = [hmac.compare_digest(candidate, key) for key in self._keys]
        return any(matches)

    def check(
        self, authorization: str | bytes | None, token: str | None = None, *, how: str
    ) -> None:
        """Raises `Unauthenticated` (telling the client `how` to send the key)
        unless `allows(authorization, token)`."""
        if not self.allows(authorization, token):
            raise Unauthenticated(f"missing or wrong API key: {how}.")
