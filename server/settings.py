"""Settings from one source.

Every knob of `sl-serve` is a field of a frozen dataclass, declared with
`knob(default, help)`: `ServerSettings` (the process) and
`server.runtime.SchedulerConfig` (per model). From the fields come the
command-line flags (`--max-streams`), the keys a config file accepts, their
type checks, and the merge of built-in default < file < flag. A new knob is
one field; nothing else to keep in step.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def knob(default: Any, help: str, *, positive: bool = False, flag: bool = True) -> Any:
    """A settings field: `help` for `--help` and the docs; `positive` rejects
    values <= 0; `flag=False` keeps it out of the generated flags (the
    config file still takes it)."""
    return dataclasses.field(
        default=default, metadata={"help": help, "positive": positive, "flag": flag}
    )


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Process-wide settings (`[server]` in a config file)."""

    host: str = knob("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    grpc_port: int = knob(50051, "gRPC port", positive=True)
    http_port: int = knob(8080, "HTTP and WebSocket port", positive=True)
    drain_seconds: float = knob(
        10.0,
        "on SIGTERM (or `POST /v1/admin/drain`), how long streams in flight may go on before "
        "they are ended or moved",
    )
    api_key_file: str | None = knob(None, "file with one API key per line: auth on")
    api_keys: tuple[str, ...] = knob((), "API keys (flag: --api-key, repeatable)", flag=False)
    resume_key_file: str | None = knob(
        None,
        "stream migration: file of HMAC keys, one a line, newest first (the first signs "
        "resume tokens, all verify, so keys rotate), e.g. a mounted Kubernetes Secret shared "
        "by the replicas; on SIGTERM, open streams then move to another replica instead of "
        "ending (server/resume.py)",
    )
    admin_key_file: str | None = knob(
        None,
        "file with one admin key per line: `POST /v1/admin/drain` then needs `Authorization: "
        "Bearer KEY` with one of them (API keys never grant admin); without it only loopback "
        "clients may call it",
    )
    tls_cert: str | None = knob(None, "PEM certificate: gRPC with TLS, HTTPS and WSS")
    tls_key: str | None = knob(None, "PEM private key for --tls-cert")
    log_level: str = knob("info", "debug, info, warning or error")
    xla_cpu_threads: int | None = knob(
        None,
        "threads XLA's CPU backend runs a tick on (its intra-op pool). Default: $PJRT_NPROC "
        "or $NPROC if set, else one less than the CPUs this process may use (at least 1), "
        "leaving a core to the event loops and the tick thread. No effect on GPU ticks",
        positive=True,
    )
    compile_cache_dir: str | None = knob(
        None,
        "JAX compilation cache: a restart with unchanged models reads compiled programs "
        "back (default $SL_COMPILE_CACHE_DIR or ~/.cache/sequence-layers-serving/jax; "
        "'off' disables)",
    )


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(hint: Any) -> Any:
    """`int | None` -> int; `tuple[int, ...]` -> tuple."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
    return typing.get_origin(hint) or hint


def _element_type(hint: Any) -> Any:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_args(hint)[0]


def add_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One flag per field of `cls` (`max_streams` -> `--max-streams`); each
    parses to None when not given, so a config file's value stays."""
    group = parser.add_argument_group(title)
    hints = _hints(cls)
    for field in dataclasses.fields(cls):
        if not field.metadata.get("flag", True):
            continue
        name = "--" + field.name.replace("_", "-")
        kind = _base_type(hints[field.name])
        default = "" if field.default in (None, ()) else f" ({field.default})"
        help_text = field.metadata.get("help", "") + default
        if kind is bool:
            group.add_argument(name, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind is tuple:
            item = _element_type(hints[field.name])
            group.add_argument(
                name,
                type=lambda text, item=item: tuple(item(v) for v in text.split(",")),
                metavar="A,B,...",
                help=help_text,
            )
        elif field.metadata.get("positive"):
            group.add_argument(
                name,
                type=_positive(kind),
                metavar=name[2:].upper().replace("-", "_"),
                help=help_text,
            )
        else:
            group.add_argument(name, type=kind, help=help_text)


def _positive(kind: type) -> Any:
    """`kind` from a flag's text, refused unless > 0 (as `check_value` refuses
    it from a file): `--max-streams 0` stops at the command line with its
    name, not as an error deep in the first tick."""

    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's message: "invalid int value: 'x'"
    return parse


def flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` given on the command line (None: not given)."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.metadata.get("flag", True) and getattr(args, f.name, None) is not None
    }


def check_value(cls: type, key: str, value: Any) -> str | None:
    """Why `value` (from a TOML file) is not valid for `cls.key`; None if it is."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        return f"unknown key `{key}`; known: {', '.join(fields)}"
    kind = _base_type(_hints(cls)[key])
    accepted: tuple[type, ...] = {float: (int, float), tuple: (list,)}.get(kind, (kind,))
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, accepted):
        names = " or ".join(t.__name__ for t in accepted)
        return f"`{key}` must be {names}, got {value!r}"
    if fields[key].metadata.get("positive") and value <= 0:
        return f"`{key}` must be positive, got {value}"
    return None


def keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def merge(cls: type[T], *layers: Mapping[str, Any]) -> T:
    """`cls` from its defaults overridden by each layer in turn (None values
    are skipped; lists become tuples, as frozen dataclasses need)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    merged = {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}
    return cls(**merged)
