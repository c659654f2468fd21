"""Resume tokens: one stream's whole state, signed, so another replica can
continue it exactly (stream migration, DESIGN.md section 8).

A draining server turns each open stream into a `StreamSnapshot` (counters,
the input it received but has not stepped, and the stream's row of the
model's state pytree), signs it with `sign_token` and sends the bytes to
the client in `moved`. The client opens a new stream anywhere with that
token; the server there calls `verify_token` and restores the snapshot
into a free slot. Tokens come back from clients, so they are parsed like
any untrusted input: no pickle, every size checked against the token's
own length before anything is allocated, and the signature is checked
before the metadata is even parsed.

Token layout (format version 1), all integers little-endian:

    offset  size  field
    0       4     magic b"SLRT"
    4       2     format version (1)
    6       2     reserved flags (0)
    8       8     key id: first 8 bytes of SHA-256("sl-resume-key-id\\0" + key)
    16      8     issued at, unix seconds (int64)
    24      4     metadata length M (bytes of UTF-8 JSON)
    28      8     data length D
    36      M     metadata: {"model", "fingerprint", "stream": {counters},
                  "arrays": [{"dtype", "shape"}, ...]} (arrays[0] is the
                  buffered input, the rest the state leaves in order)
    36+M    D     the arrays' bytes, C order, little-endian, back to back
    36+M+D  32    HMAC-SHA256 over every byte before it

    keys = load_keys("/etc/sl/resume-keys")     # first signs, all verify
    token = sign_token(snapshot, keys, model_name="demo-asr", fingerprint=fp)
    snapshot = verify_token(token, keys, model_name="demo-asr", fingerprint=fp)

What the runtime does with these: at start, `load_keys(--resume-key-file)`
and `model_fingerprint(model)` once per model. On drain, per open stream:
stop scheduling it, let its ticks in flight be delivered and its outputs be
written, copy its state row to the host, `sign_token`, then send `moved`
(gRPC `StreamMoved`; WebSocket `token_to_text` and close 1001, still reading
the client's frames so the close completes). On a config with a token
(gRPC `resume_token`; WebSocket `token_from_text` of `?resume_token=` or of
the first message with `?resume=1`): `verify_token`, `check_state_layout`,
a free slot, the state row written instead of reset, the counters and
buffered input restored; the resumed WebSocket `started` adds
`output_offset = frames_emitted`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import math
import os
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server.errors import StreamError

if TYPE_CHECKING:
    from server.model import ServableModel

FORMAT_VERSION = 1
MAGIC = b"SLRT"
_HEADER = struct.Struct("<4sHH8sqIQ")
MAC_BYTES = 32
KEY_ID_BYTES = 8
# 32 characters: `openssl rand -hex 16` at least; the docs suggest -hex 32.
MIN_KEY_CHARS = 32
# A token travels in one gRPC message (the server accepts 16 MiB) or one
# WebSocket message; a bigger one could not come back anyway.
MAX_TOKEN_BYTES = 16 * 1024 * 1024
# Our own metadata is a few hundred bytes plus one entry per state leaf.
MAX_METADATA_BYTES = 256 * 1024
MAX_ARRAYS = 4096
MAX_NDIM = 8
# A moved stream's client reconnects within seconds; minutes of slack
# cover a slow rollout, not a replay hours later.
DEFAULT_MAX_AGE_S = 300.0
# Replicas' clocks may disagree by this much before a token reads as
# issued in the future.
CLOCK_SKEW_S = 30.0

_DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
    "bfloat16",
)


# Errors ---------------------------------------------------------------------
# Each carries the gRPC status the front doors send (server/errors.py); the
# WebSocket close code for the new ones is 1008 (see docs in protos/ and
# clients). No restore happens on any of them.


class ResumeTokenError(StreamError):
    """Base of every refusal of a resume token."""

    code = "INVALID_ARGUMENT"


class TokenMalformed(ResumeTokenError):
    """Not a token, truncated, or inconsistent: the bytes were damaged."""

    code = "INVALID_ARGUMENT"


class TokenTooLarge(TokenMalformed):
    """Over the size limit (verify: refused unread; sign: cannot be handed off)."""


class TokenUnsupportedVersion(TokenMalformed):
    """Written by a release with another token format."""


class TokenSignatureInvalid(ResumeTokenError):
    """The HMAC does not verify: the token was altered (or forged)."""

    code = "PERMISSION_DENIED"


class TokenUnknownKey(TokenSignatureInvalid):
    """Signed with a key this server does not hold (another deployment, or a
    key already rotated out)."""


class TokenModelMismatch(ResumeTokenError):
    """The token is for another model than the stream opens."""

    code = "FAILED_PRECONDITION"


class TokenFingerprintMismatch(TokenModelMismatch):
    """Same model name, other weights, config or state layout."""


class ResumeNotConfigured(ResumeTokenError):
    """This server has no resume keys, so it cannot check any token."""

    code = "FAILED_PRECONDITION"


class TokenNotYetValid(ResumeTokenError):
    """Issued in the future beyond `CLOCK_SKEW_S`: replica clocks disagree."""

    code = "FAILED_PRECONDITION"


class TokenExpired(ResumeTokenError):
    """Older than the server's maximum age: the stream is gone for good."""

    code = "DEADLINE_EXCEEDED"


class ResumeKeyError(ValueError):
    """The key file cannot be used; raised at start-up, says how to fix it."""


# Keys -----------------------------------------------------------------------


def key_id(key: bytes) -> bytes:
    """8 bytes naming a key in tokens without revealing it."""
    return hashlib.sha256(b"sl-resume-key-id\0" + key).digest()[:KEY_ID_BYTES]


@dataclasses.dataclass(frozen=True)
class ResumeKeys:
    """HMAC keys, newest first: `keys[0]` signs, every key verifies, so a
    rotation adds the new key on top, rolls out, and later drops the old."""

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ResumeKeyError("no resume keys: give at least one.")
        short = [i for i, k in enumerate(self.keys) if len(k) < MIN_KEY_CHARS]
        if short:
            raise ResumeKeyError(
                f"resume key #{short[0] + 1} has {len(self.keys[short[0]])} bytes; use at "
                f"least {MIN_KEY_CHARS} (e.g. `openssl rand -hex 32`)."
            )

    @property
    def signing(self) -> bytes:
        return self.keys[0]

    def find(self, kid: bytes) -> bytes | None:
        return next((k for k in self.keys if hmac.compare_digest(key_id(k), kid)), None)


def parse_keys(text: str, source: str = "resume keys") -> ResumeKeys:
    """One key a line; blank lines and `#` comments are skipped; a key is
    the line's text (stripped), at least `MIN_KEY_CHARS` characters."""
    keys: list[bytes] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if any(c.isspace() for c in line):
            raise ResumeKeyError(
                f"{source}:{lineno}: a key contains whitespace; put one key per line."
            )
        if len(line) < MIN_KEY_CHARS:
            # Never echo the key: the message may end up in logs.
            raise ResumeKeyError(
                f"{source}:{lineno}: key is {len(line)} characters; use at least "
                f"{MIN_KEY_CHARS} (e.g. `openssl rand -hex 32`)."
            )
        key = line.encode()
        if key not in keys:
            keys.append(key)
    if not keys:
        raise ResumeKeyError(
            f"{source} has no keys: put one key per line, newest first "
            "(e.g. `openssl rand -hex 32 > FILE`)."
        )
    return ResumeKeys(tuple(keys))


def load_keys(path: str | os.PathLike[str]) -> ResumeKeys:
    """Reads `--resume-key-file` (e.g. a mounted Kubernetes Secret)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ResumeKeyError(f"cannot read resume key file {path}: {e}") from None
    return parse_keys(text, str(path))


# Snapshot -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamSnapshot:
    """One stream between two servers: everything host-side plus its state.

    Invariant: `frames_received == frames_consumed + len(buffered_input)`;
    the server takes a snapshot after every dispatched tick of the stream
    was delivered (nothing in flight) and every output was sent.
    """

    stream_id: str
    # Input frames received from the client; it resends from here.
    frames_received: int
    # Input frames stepped through the model.
    frames_consumed: int
    # Valid output frames sent; the offset of the next output.
    frames_emitted: int
    # Ticks this stream took part in (reported in `ended`).
    ticks: int
    # Leading outputs still to drop (the model's output latency not yet reached).
    outputs_to_drop: int
    # `[n, *input_shape]`: received, not yet stepped (model input dtype).
    buffered_input: np.ndarray
    # The stream's row of the state pytree, leaves in `jax.tree.leaves` order,
    # without the slot axis: host arrays, or once a resuming server verified
    # the token, that server's device arrays (`Engine.verify`).
    state: tuple[Any, ...]
    # The client sent `end`: the flush of the model's latency is under way.
    ending: bool = False
    # Invalid frames still to feed when ending.
    flush_frames: int = 0
    # JSON-able extras the runtime wants back (e.g. the speech segmenter).
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def check(self) -> None:
        """Raises TokenMalformed if the counters contradict each other."""
        counters = {f: getattr(self, f) for f in _COUNTERS}
        bad = {k: v for k, v in counters.items() if type(v) is not int or v < 0}
        if bad or not isinstance(self.ending, bool):
            raise TokenMalformed(
                f"stream counters must be non-negative ints and `ending` a bool: {bad}, "
                f"{self.ending=}"
            )
        if self.buffered_input.ndim < 1:
            raise TokenMalformed(
                f"buffered input must be [frames, ...], got {self.buffered_input.shape=}"
            )
        if self.frames_received != self.frames_consumed + self.buffered_input.shape[0]:
            raise TokenMalformed(
                f"{self.frames_received=} is not {self.frames_consumed=} + "
                f"{self.buffered_input.shape[0]} buffered frames."
            )
        if self.flush_frames and not self.ending:
            raise TokenMalformed(f"{self.flush_frames=} on a stream that is not ending.")


_COUNTERS = (
    "frames_received",
    "frames_consumed",
    "frames_emitted",
    "ticks",
    "outputs_to_drop",
    "flush_frames",
)


# Sign and verify --------------------------------------------------------------


def _dtype(name: str) -> np.dtype[Any]:
    if name not in _DTYPES:
        raise TokenMalformed(f"array dtype {name!r} is not one a token may carry.")
    if name == "bfloat16":
        import ml_dtypes  # shipped with jax; only tokens with bfloat16 state need it

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def sign_token(
    snapshot: StreamSnapshot,
    keys: ResumeKeys,
    *,
    model_name: str,
    fingerprint: str,
    now: float | None = None,
    max_bytes: int = MAX_TOKEN_BYTES,
) -> bytes:
    """The signed token for `snapshot` (layout in the module docstring).

    Raises TokenTooLarge when it would exceed `max_bytes` (the server then
    ends the stream as before migration existed, with UNAVAILABLE)."""
    snapshot.check()
    arrays = [np.asarray(snapshot.buffered_input), *(np.asarray(a) for a in snapshot.state)]
    if len(arrays) > MAX_ARRAYS:
        raise TokenTooLarge(f"{len(arrays) - 1} state leaves; a token carries {MAX_ARRAYS - 1}.")
    specs = []
    for a in arrays:
        _dtype(a.dtype.name)  # refuses dtypes the verifier would refuse
        if a.ndim > MAX_NDIM:
            raise TokenTooLarge(f"array of {a.ndim} dimensions; a token carries {MAX_NDIM}.")
        specs.append({"dtype": a.dtype.name, "shape": list(a.shape)})
    stream = {f: getattr(snapshot, f) for f in _COUNTERS}
    stream.update(stream_id=snapshot.stream_id, ending=bool(snapshot.ending))
    meta = {
        "model": model_name,
        "fingerprint": fingerprint,
        "stream": stream,
        "extra": dict(snapshot.extra),
        "arrays": specs,
    }
    meta_bytes = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    if len(meta_bytes) > MAX_METADATA_BYTES:
        raise TokenTooLarge(
            f"metadata of {len(meta_bytes)} bytes; the limit is {MAX_METADATA_BYTES}."
        )
    data_len = sum(a.nbytes for a in arrays)
    total = _HEADER.size + len(meta_bytes) + data_len + MAC_BYTES
    if total > max_bytes:
        raise TokenTooLarge(f"the stream's token would be {total} bytes; the limit is {max_bytes}.")
    issued = int(time.time() if now is None else now)
    parts = [
        _HEADER.pack(
            MAGIC, FORMAT_VERSION, 0, key_id(keys.signing), issued, len(meta_bytes), data_len
        ),
        meta_bytes,
    ]
    # Little-endian, C order, whatever the host's byte order.
    parts += [np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes() for a in arrays]
    body = b"".join(parts)
    return body + hmac.new(keys.signing, body, hashlib.sha256).digest()


def verify_token(
    token: bytes,
    keys: ResumeKeys,
    *,
    model_name: str,
    fingerprint: str,
    max_age_s: float = DEFAULT_MAX_AGE_S,
    now: float | None = None,
    max_bytes: int = MAX_TOKEN_BYTES,
) -> StreamSnapshot:
    """The snapshot inside `token`, or a `ResumeTokenError` saying why not.

    Checks in this order: size and framing (TokenMalformed, TokenTooLarge,
    TokenUnsupportedVersion), key and signature (TokenUnknownKey,
    TokenSignatureInvalid), then, on signed bytes only, model and
    fingerprint (TokenModelMismatch, TokenFingerprintMismatch) and age
    (TokenExpired, TokenNotYetValid)."""
    if not isinstance(token, bytes | bytearray | memoryview):
        raise TokenMalformed(f"a resume token is bytes, got {type(token).__name__}.")
    token = bytes(token)
    if len(token) > max_bytes:
        raise TokenTooLarge(f"resume token of {len(token)} bytes exceeds the limit of {max_bytes}.")
    if len(token) < _HEADER.size + MAC_BYTES:
        raise TokenMalformed(
            f"resume token of {len(token)} bytes is truncated: send it exactly as the "
            "`moved` message gave it."
        )
    magic, version, _flags, kid, issued, meta_len, data_len = _HEADER.unpack_from(token)
    if magic != MAGIC:
        raise TokenMalformed("not a resume token: send the bytes of a `moved` message's token.")
    if version != FORMAT_VERSION:
        raise TokenUnsupportedVersion(
            f"resume token format {version}; this server reads format {FORMAT_VERSION}: "
            "resume on a server of the same release."
        )
    expected = _HEADER.size + meta_len + data_len + MAC_BYTES
    if len(token) != expected:
        raise TokenMalformed(
            f"resume token has {len(token)} bytes but its header says {expected}: it was "
            "truncated or padded in transit."
        )
    key = keys.find(kid)
    if key is None:
        raise TokenUnknownKey(
            f"resume token was signed with a key this server does not hold (key id "
            f"{kid.hex()}): replicas must share --resume-key-file."
        )
    # A view, not a copy of the body: hashing it releases the GIL, so a
    # token verified on a worker thread leaves the event loop running.
    body, mac = memoryview(token)[:-MAC_BYTES], token[-MAC_BYTES:]
    if not hmac.compare_digest(hmac.digest(key, body, "sha256"), mac):
        raise TokenSignatureInvalid("resume token signature does not verify: it was altered.")
    meta = _parse_metadata(token[_HEADER.size : _HEADER.size + meta_len])
    if meta["model"] != model_name:
        raise TokenModelMismatch(
            f"resume token is for model {meta['model']!r}; this stream opens {model_name!r}: "
            "open the stream with the token's model."
        )
    if meta["fingerprint"] != fingerprint:
        raise TokenFingerprintMismatch(
            f"resume token is for another version of model {model_name!r} (fingerprint "
            f"{str(meta['fingerprint'])[:12]}, this server {fingerprint[:12]}): resume on a "
            "replica serving the same model files."
        )
    clock = time.time() if now is None else now
    if issued - clock > CLOCK_SKEW_S:
        raise TokenNotYetValid(
            f"resume token issued {issued - clock:.0f} s in the future: the replicas' clocks "
            f"disagree by more than {CLOCK_SKEW_S:.0f} s."
        )
    if clock - issued > max_age_s:
        raise TokenExpired(
            f"resume token is {clock - issued:.0f} s old; tokens are valid for "
            f"{max_age_s:.0f} s: start a new stream."
        )
    arrays = _read_arrays(token, _HEADER.size + meta_len, data_len, meta["arrays"])
    stream = meta["stream"]
    snapshot = StreamSnapshot(
        stream_id=stream["stream_id"],
        buffered_input=arrays[0],
        state=tuple(arrays[1:]),
        ending=stream["ending"],
        extra=meta["extra"],
        **{f: stream[f] for f in _COUNTERS},
    )
    snapshot.check()
    return snapshot


def _parse_metadata(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_METADATA_BYTES:
        raise TokenMalformed(f"token metadata of {len(raw)} bytes exceeds {MAX_METADATA_BYTES}.")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TokenMalformed("token metadata is not JSON.") from None
    shape = {"model": str, "fingerprint": str, "stream": dict, "extra": dict, "arrays": list}
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in shape.items()):
        raise TokenMalformed(f"token metadata lacks one of {sorted(shape)}.")
    stream = meta["stream"]
    if not isinstance(stream.get("stream_id"), str) or not isinstance(stream.get("ending"), bool):
        raise TokenMalformed("token metadata lacks stream_id or ending.")
    for f in _COUNTERS:
        if type(stream.get(f)) is not int:
            raise TokenMalformed(f"token counter {f} is missing or not an integer.")
    if not 1 <= len(meta["arrays"]) <= MAX_ARRAYS:
        raise TokenMalformed(f"token has {len(meta['arrays'])} arrays; 1 to {MAX_ARRAYS} allowed.")
    return meta


def _read_arrays(token: bytes, start: int, data_len: int, specs: list[Any]) -> list[np.ndarray]:
    """Arrays from `token[start : start + data_len]`; every size is checked
    against the bytes at hand, so nothing larger than the token is made."""
    arrays = []
    offset = start
    end = start + data_len
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list):
            raise TokenMalformed(f"token array #{i} has no shape.")
        shape = spec["shape"]
        if len(shape) > MAX_NDIM or any(type(d) is not int or d < 0 for d in shape):
            raise TokenMalformed(f"token array #{i} has an invalid shape {shape[: MAX_NDIM + 1]}.")
        dtype = _dtype(str(spec.get("dtype")))
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > end - offset:
            raise TokenMalformed(f"token array #{i} ({shape} {dtype.name}) overruns the data.")
        raw = np.frombuffer(token, dtype.newbyteorder("<"), math.prod(shape), offset)
        # A native-order, writable copy the runtime may hand to the device.
        arrays.append(raw.astype(dtype, copy=True).reshape(shape))
        offset += nbytes
    if offset != end:
        raise TokenMalformed(f"token data has {end - offset} bytes no array accounts for.")
    return arrays


def token_to_text(token: bytes) -> str:
    """The token for a WebSocket `moved` message (standard base64)."""
    return base64.b64encode(token).decode("ascii")


def token_from_text(text: str, max_bytes: int = MAX_TOKEN_BYTES) -> bytes:
    """A token from a WebSocket client: the `resume_token` query parameter
    (base64url) or the first message's (either alphabet, padding optional).
    Checks the length before decoding, so a huge string allocates nothing."""
    if not isinstance(text, str):
        raise TokenMalformed(f"resume_token must be a base64 string, got {type(text).__name__}.")
    if len(text) > (max_bytes + 2) // 3 * 4:
        raise TokenTooLarge(
            f"resume_token of {len(text)} characters exceeds the limit of {max_bytes} bytes."
        )
    standard = text.strip().replace("-", "+").replace("_", "/").rstrip("=")
    try:
        return base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise TokenMalformed(
            "resume_token is not base64: send the `moved` message's token unchanged "
            "(base64url in the URL)."
        ) from None


def check_state_layout(
    state: Sequence[np.ndarray], expected: Iterable[tuple[Sequence[int], Any]]
) -> None:
    """Raises TokenFingerprintMismatch unless `state`'s leaves have exactly
    the `(shape, dtype)`s of this server's per-stream state (same model
    files under another library version can still lay state out otherwise)."""
    want = [(tuple(int(d) for d in s), np.dtype(d).name) for s, d in expected]
    got = [(tuple(a.shape), a.dtype.name) for a in state]
    if got != want:
        first = next((i for i, (g, w) in enumerate(zip(got, want, strict=False)) if g != w), None)
        where = f"leaf {first}: {got[first]} vs {want[first]}" if first is not None else ""
        raise TokenFingerprintMismatch(
            f"resume token's state has {len(got)} leaves, this server's {len(want)} ({where}): "
            "resume on a replica running the same release."
        )


# Model fingerprint ---------------------------------------------------------------


def fingerprint_of(
    name: str,
    spec: Mapping[str, Any],
    definition: bytes,
    parameters: Iterable[tuple[str, np.ndarray]],
) -> str:
    """SHA-256 (hex) of a model's name, its streaming spec (JSON-able), its
    step's definition and its parameters `(path, array)`, in the order given."""
    h = hashlib.sha256(b"sl-model-fingerprint\0v1\0")

    def field(data: bytes) -> None:
        # Length-prefixed, so no two different inputs hash the same bytes.
        h.update(struct.pack("<Q", len(data)))
        h.update(data)

    field(name.encode())
    field(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode())
    field(definition)
    for path, value in parameters:
        a = np.asarray(value)
        field(f"{path}:{a.dtype.name}:{list(a.shape)}".encode())
        field(np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def model_fingerprint(model: ServableModel) -> str:
    """The fingerprint tokens are bound to: name, input and step signature,
    config (or exported programs) and every parameter byte. Not the
    description or `max_streams`, which do not change what a state means.
    Reads parameters to the host once: compute it at model load."""
    import jax  # the runtime has it loaded already; this module stays numpy-only

    sig = model.signature
    spec = {
        "input_shape": list(model.input_shape),
        "input_dtype": model.input_dtype,
        "sample_rate": model.sample_rate,
        "signature": sig.to_json(),
    }
    if model.config is not None:
        from sequence_layers import serialization

        definition = serialization.dumps(model.config).encode()
    else:
        exported = model.exported
        assert exported is not None  # ServableModel has a config or programs
        definition = bytes(exported.init_artifact.serialize()) + bytes(
            exported.step_artifact.serialize()
        )
    leaves, _ = jax.tree_util.tree_flatten_with_path(model.variables)
    parameters = ((jax.tree_util.keystr(p), np.asarray(v)) for p, v in leaves)
    return fingerprint_of(model.name, spec, definition, parameters)
