"""Resume tokens (server/resume.py): a snapshot round-trips exactly; any
altered byte, foreign key, other model or version, old token, truncation or
oversize is refused with its own typed error and status; keys rotate; the
model fingerprint is stable and sensitive to what changes a state's meaning."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from server import resume
from server.resume import (
    ResumeKeyError,
    ResumeKeys,
    StreamSnapshot,
    TokenExpired,
    TokenFingerprintMismatch,
    TokenMalformed,
    TokenModelMismatch,
    TokenNotYetValid,
    TokenSignatureInvalid,
    TokenTooLarge,
    TokenUnknownKey,
    TokenUnsupportedVersion,
    sign_token,
    verify_token,
)

NOW = 1_800_000_000.0
KEY_A = b"a" * 64
KEY_B = b"b" * 64
FP = "f" * 64


def snapshot(seed: int = 0, **overrides: object) -> StreamSnapshot:
    rng = np.random.default_rng(seed)
    buffered = rng.normal(size=(37, 1)).astype(np.float32)
    state = (
        rng.normal(size=(4, 64, 2, 36)).astype(np.float32),  # a KV cache
        rng.integers(-5, 5, size=(3,), dtype=np.int32),
        np.asarray(rng.normal(size=(2, 5)), ml_dtypes.bfloat16),
        np.array(True),  # 0-d leaves exist (e.g. a "started" flag)
        np.zeros((0, 7), np.float16),  # and empty ones
        rng.normal(size=(6,)).astype(np.float64),
    )
    fields: dict[str, object] = dict(
        stream_id="stream-7",
        frames_received=1637,
        frames_consumed=1600,
        frames_emitted=38,
        ticks=4,
        outputs_to_drop=2,
        buffered_input=buffered,
        state=state,
        extra={"segments": {"speaking": True, "silence_from": 1536}},
    )
    fields.update(overrides)
    return StreamSnapshot(**fields)  # type: ignore[arg-type]


def sign(
    snap: StreamSnapshot | None = None, keys: tuple[bytes, ...] = (KEY_A,), **kw: object
) -> bytes:
    kwargs: dict[str, object] = dict(model_name="demo-asr", fingerprint=FP, now=NOW)
    kwargs.update(kw)
    return sign_token(snap or snapshot(), ResumeKeys(keys), **kwargs)  # type: ignore[arg-type]


def verify(token: bytes, keys: tuple[bytes, ...] = (KEY_A,), **kw: object) -> StreamSnapshot:
    kwargs: dict[str, object] = dict(model_name="demo-asr", fingerprint=FP, now=NOW + 5)
    kwargs.update(kw)
    return verify_token(token, ResumeKeys(keys), **kwargs)  # type: ignore[arg-type]


def assert_same(a: StreamSnapshot, b: StreamSnapshot) -> None:
    for f in dataclasses.fields(StreamSnapshot):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "state":
            assert len(x) == len(y)
            for u, v in zip(x, y, strict=True):
                assert u.dtype == v.dtype and u.shape == v.shape
                np.testing.assert_array_equal(u, v)  # bit-exact: atol = rtol = 0
        elif f.name == "buffered_input":
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y, f.name


def test_round_trip_restores_every_array_and_counter_exactly() -> None:
    original = snapshot(ending=True, flush_frames=411)
    restored = verify(sign(original))
    assert_same(restored, original)
    for leaf in restored.state:
        assert leaf.flags.writeable and leaf.dtype.isnative  # ready for the device


def test_token_layout_is_the_documented_one() -> None:
    token = sign()
    magic, version, flags, kid, issued, meta_len, data_len = struct.unpack_from("<4sHH8sqIQ", token)
    assert (magic, version, flags) == (b"SLRT", 1, 0)
    assert kid == resume.key_id(KEY_A) and issued == int(NOW)
    assert len(token) == 36 + meta_len + data_len + 32
    snap = snapshot()
    assert data_len == snap.buffered_input.nbytes + sum(a.nbytes for a in snap.state)


@pytest.mark.parametrize("position", ["magic", "version", "key_id", "issued", "lengths",
                                      "metadata", "data", "mac"])  # fmt: skip
def test_an_altered_byte_anywhere_is_refused(position: str) -> None:
    token = bytearray(sign())
    meta_len = struct.unpack_from("<I", token, 24)[0]
    index = {
        "magic": 0, "version": 4, "key_id": 9, "issued": 17, "lengths": 25,
        "metadata": 36 + meta_len // 2, "data": 36 + meta_len + 100, "mac": len(token) - 1,
    }[position]  # fmt: skip
    token[index] ^= 0x01
    with pytest.raises(resume.ResumeTokenError) as info:
        verify(bytes(token))
    # Framing fields fail as malformed, everything else as a bad signature:
    # either way nothing of the token is used.
    assert info.value.code in ("INVALID_ARGUMENT", "PERMISSION_DENIED")
    if position in ("metadata", "data", "mac", "issued"):
        assert isinstance(info.value, TokenSignatureInvalid)
        assert info.value.code == "PERMISSION_DENIED"
    if position == "key_id":
        assert isinstance(info.value, TokenUnknownKey)


def test_every_single_byte_flip_is_refused() -> None:
    # Small snapshot, so flipping each byte in turn stays fast.
    small = snapshot(
        buffered_input=np.ones((1, 1), np.float32),
        frames_received=1601,
        state=(np.arange(3, dtype=np.int32),),
        extra={},
    )
    token = sign(small)
    for i in range(len(token)):
        damaged = bytearray(token)
        damaged[i] ^= 0x80
        with pytest.raises(resume.ResumeTokenError):
            verify(bytes(damaged))


def test_another_key_is_refused_and_keys_rotate() -> None:
    old = sign(keys=(KEY_A,))
    with pytest.raises(TokenUnknownKey, match="does not hold") as info:
        verify(old, keys=(KEY_B,))
    assert info.value.code == "PERMISSION_DENIED"
    # Rotation step 1: the new key goes on top; tokens from replicas still
    # on the old key keep verifying, and new tokens are signed with the new.
    rotated = (KEY_B, KEY_A)
    assert_same(verify(old, keys=rotated), snapshot())
    new = sign(keys=rotated)
    assert new[8:16] == resume.key_id(KEY_B)
    assert_same(verify(new, keys=(KEY_A, KEY_B)), snapshot())  # order does not matter to verify
    # Step 2: the old key is dropped; its tokens are refused.
    with pytest.raises(TokenUnknownKey):
        verify(old, keys=(KEY_B,))


def test_a_token_re_signed_with_a_key_forged_for_its_key_id_fails() -> None:
    # Forging needs the key: same key id, body re-MACed with a wrong key.
    token = sign()
    body = token[:-32]
    forged = body + hmac.new(b"x" * 64, body, hashlib.sha256).digest()
    with pytest.raises(TokenSignatureInvalid, match="altered"):
        verify(forged)


def test_other_model_and_fingerprint_are_refused() -> None:
    token = sign()
    with pytest.raises(TokenModelMismatch, match=r"'demo-asr'.*'logmel'") as info:
        verify(token, model_name="logmel")
    assert info.value.code == "FAILED_PRECONDITION"
    with pytest.raises(TokenFingerprintMismatch, match="another version") as info2:
        verify(token, fingerprint="0" * 64)
    assert info2.value.code == "FAILED_PRECONDITION"


def test_expired_and_future_tokens_are_refused() -> None:
    token = sign()
    assert_same(verify(token, now=NOW + 299, max_age_s=300), snapshot())
    with pytest.raises(TokenExpired, match="301 s old") as info:
        verify(token, now=NOW + 301, max_age_s=300)
    assert info.value.code == "DEADLINE_EXCEEDED"
    verify(token, now=NOW - 20)  # clock skew within CLOCK_SKEW_S
    with pytest.raises(TokenNotYetValid, match="clocks") as info2:
        verify(token, now=NOW - 120)
    assert info2.value.code == "FAILED_PRECONDITION"


@pytest.mark.parametrize(
    "damage",
    ["empty", "short", "garbage", "truncated", "padded", "text", "version", "not_bytes"],
)
def test_truncated_or_garbage_tokens_get_a_clear_error(damage: str) -> None:
    token = sign()
    bad: object = {
        "empty": b"",
        "short": token[:20],
        "garbage": np.random.default_rng(0).bytes(500),
        "truncated": token[:-1],
        "padded": token + b"\0",
        "text": b"eyJoZWxsbyI6IDF9" * 10,
        "version": token[:4] + struct.pack("<H", 9) + token[6:],
        "not_bytes": "a string",
    }[damage]
    with pytest.raises(TokenMalformed) as info:
        verify(bad)  # type: ignore[arg-type]
    assert info.value.code == "INVALID_ARGUMENT"
    assert len(info.value.message) > 20  # a sentence, not a struct.error
    if damage == "version":
        assert isinstance(info.value, TokenUnsupportedVersion)
        assert "format 9" in info.value.message


def test_signed_but_inconsistent_metadata_is_malformed() -> None:
    # A server bug (or a future format) could sign nonsense: still no crash.
    token = bytearray(sign())
    meta_len = struct.unpack_from("<I", token, 24)[0]
    meta = bytes(token[36 : 36 + meta_len]).replace(b'"shape":[37,1]', b'"shape":[99,1]')
    assert len(meta) == meta_len
    body = bytes(token[:36]) + meta + bytes(token[36 + meta_len : -32])
    resigned = body + hmac.new(KEY_A, body, hashlib.sha256).digest()
    with pytest.raises(TokenMalformed, match=r"overruns|accounts"):
        verify(resigned)


def test_size_limits() -> None:
    token = sign()
    with pytest.raises(TokenTooLarge, match="exceeds the limit"):
        verify(token, max_bytes=len(token) - 1)
    with pytest.raises(TokenTooLarge, match="would be"):
        sign(max_bytes=1000)
    # A header claiming huge sizes is refused from the token's real length,
    # before anything is allocated.
    huge = bytearray(token)
    struct.pack_into("<IQ", huge, 24, 2**32 - 1, 2**63)
    with pytest.raises(TokenMalformed, match="header says"):
        verify(bytes(huge))
    with pytest.raises(TokenTooLarge):
        sign(snapshot(state=tuple(np.zeros(1, np.float32) for _ in range(5000))))


def test_snapshot_counters_must_agree() -> None:
    with pytest.raises(TokenMalformed, match="buffered"):
        sign(snapshot(frames_received=1000))
    with pytest.raises(TokenMalformed, match="not ending"):
        sign(snapshot(flush_frames=3))
    with pytest.raises(TokenMalformed, match="non-negative"):
        sign(snapshot(ticks=-1))
    with pytest.raises(TokenMalformed, match="may carry"):
        sign(snapshot(state=(np.zeros(2, object),)))


def test_check_state_layout() -> None:
    snap = snapshot()
    layout = [(a.shape, a.dtype) for a in snap.state]
    resume.check_state_layout(snap.state, layout)
    with pytest.raises(TokenFingerprintMismatch, match="leaf 1"):
        resume.check_state_layout(snap.state, [layout[0], ((4,), np.int32), *layout[2:]])
    with pytest.raises(TokenFingerprintMismatch, match="6 leaves, this server's 5"):
        resume.check_state_layout(snap.state, layout[:5])


def test_load_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(
        f"# rotated 2026-12-01\n\n  {KEY_B.decode()}  \n{KEY_A.decode()}\n{KEY_B.decode()}\n"
    )
    keys = resume.load_keys(path)
    assert keys.keys == (KEY_B, KEY_A) and keys.signing == KEY_B
    cases = {
        "": "has no keys",
        "# only a comment\n\n": "has no keys",
        "short\n": ":1: key is 5 characters; use at least 32",
        f"{KEY_A.decode()}\nab cd{'x' * 40}\n": ":2: a key contains whitespace",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ResumeKeyError, match=message) as info:
            resume.load_keys(path)
        assert KEY_A.decode() not in str(info.value)  # keys never reach the logs
    with pytest.raises(ResumeKeyError, match="cannot read"):
        resume.load_keys(tmp_path / "missing")
    with pytest.raises(ResumeKeyError, match="at least 32"):
        ResumeKeys((b"tiny",))


def test_fingerprint_of_is_stable_and_sensitive() -> None:
    params = [("['params']['w']", np.arange(6, dtype=np.float32).reshape(2, 3))]
    spec = {"input_shape": [1], "signature": {"block_size": 160}}
    base = resume.fingerprint_of("m", spec, b"config", params)
    assert base == resume.fingerprint_of("m", dict(reversed(spec.items())), b"config", params)
    changed = [
        resume.fingerprint_of("m2", spec, b"config", params),
        resume.fingerprint_of("m", {**spec, "input_shape": [2]}, b"config", params),
        resume.fingerprint_of("m", spec, b"config2", params),
        resume.fingerprint_of("m", spec, b"config", [(params[0][0], params[0][1] + 1e-7)]),
        resume.fingerprint_of("m", spec, b"config", [(params[0][0], params[0][1].astype("f8"))]),
        resume.fingerprint_of("m", spec, b"config", [(params[0][0], params[0][1].reshape(3, 2))]),
        resume.fingerprint_of("m", spec, b"config", []),
    ]
    assert len({base, *changed}) == len(changed) + 1


def test_model_fingerprint_of_a_servable_model() -> None:
    import sequence_layers as sl
    from server.model import ServableModel, init_variables

    config = sl.Serial.Config((sl.Conv1D.Config(filters=4, kernel_size=3, padding="causal"),))

    def make(seed: int, description: str = "") -> ServableModel:
        return ServableModel("m", config, init_variables(config, (2,), seed=seed), (2,),
                             description=description)  # fmt: skip

    a = resume.model_fingerprint(make(1))
    assert len(a) == 64 and a == resume.model_fingerprint(make(1, "other words"))
    assert a != resume.model_fingerprint(make(2))  # other weights: other fingerprint


def test_module_imports_without_jax() -> None:
    code = "import sys, server.resume; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_token_text_for_websockets() -> None:
    token = sign()
    text = resume.token_to_text(token)
    assert resume.token_from_text(text) == token
    url_form = text.replace("+", "-").replace("/", "_").rstrip("=")
    assert resume.token_from_text(url_form) == token  # the query parameter's form
    with pytest.raises(TokenMalformed, match="not base64"):
        resume.token_from_text("not base64 at all!")
    with pytest.raises(TokenTooLarge):
        resume.token_from_text("A" * 1000, max_bytes=100)
    with pytest.raises(TokenMalformed):
        resume.token_from_text(None)  # type: ignore[arg-type]
