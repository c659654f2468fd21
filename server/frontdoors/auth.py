"""The API-key check both front doors use, and the admin check of the admin
routes (`AdminAccess`).

API keys: off when no key is configured. On, a request carries the key as
`Authorization: Bearer KEY` (gRPC metadata `authorization`, an HTTP or
WebSocket header) or, where browsers cannot set headers, as `?token=KEY`.
Keys compare in constant time, so response timing does not reveal a prefix.

Example:
    keys = ApiKeys(["s3cret"])
    keys.check("Bearer s3cret", how=HEADER_HINT)      # passes
    keys.check(None, token="nope", how=HEADER_HINT)   # raises Unauthenticated
    AdminAccess().check(None, client_host="10.0.0.7") # raises PermissionDenied
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from server.errors import PermissionDenied, Unauthenticated

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


class AdminAccess:
    """Who may call the admin routes (`POST /v1/admin/drain`).

    With admin keys (`--admin-key-file`): a request whose `Authorization:
    Bearer KEY` is one of them, from anywhere; never an API key (those are
    the clients', and a client must not be able to drain the server). Without
    admin keys: loopback clients only (127.0.0.0/8, ::1), i.e. someone on the
    host or in the pod (`kubectl exec`, `kubectl port-forward`). The key is
    never taken from the query string: URLs end up in access logs.
    """

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = ApiKeys(keys)

    @property
    def keyed(self) -> bool:
        return self._keys.enabled

    def check(self, authorization: str | None, *, client_host: str | None) -> None:
        """Raises `Unauthenticated` (a missing or wrong admin key) or
        `PermissionDenied` (no admin keys, and the client is not on loopback)."""
        if self._keys.enabled:
            if not self._keys.allows(authorization):
                raise Unauthenticated(
                    "missing or wrong admin key: send `Authorization: Bearer <key>` with a key "
                    "from --admin-key-file (API keys do not grant admin)."
                )
            return
        if not is_loopback(client_host):
            raise PermissionDenied(
                f"admin calls come from loopback only when the server has no --admin-key-file; "
                f"this one came from {client_host or 'an unknown address'}. Call it on the host "
                "(or `kubectl exec` into the pod), or start sl-serve with --admin-key-file."
            )


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for names
    and anything unparsable (fail closed)."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
