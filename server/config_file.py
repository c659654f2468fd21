"""`sl-serve --config server.toml`: several models with their own knobs.

    [server]
    host = "0.0.0.0"
    grpc_port = 50051
    http_port = 8080
    drain_seconds = 20
    api_key_file = "/etc/sl/keys"

    [defaults]              # scheduler knobs for every model
    max_streams = 32
    max_batch_delay_ms = 5

    [models.asr]
    path = "/models/asr"    # a model directory, or: builtin = "demo-asr"
    max_streams = 64
    chunk_blocks = 4
    device = "gpu:0"        # optional: pin this model to one device

Command-line flags override the file. Errors name the file, the line and the
reason, and stop the server before it starts.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

from server.scheduler import SchedulerConfig

SERVER_KEYS: dict[str, type | tuple[type, ...]] = {
    "host": str,
    "grpc_port": int,
    "http_port": int,
    "drain_seconds": (int, float),
    "api_key_file": str,
    "api_keys": list,
    "tls_cert": str,
    "tls_key": str,
    "log_level": str,
    "compile_cache_dir": str,
}
SCHEDULER_KEYS: dict[str, type | tuple[type, ...]] = {
    "max_streams": int,
    "chunk_blocks": int,
    "max_batch_delay_ms": (int, float),
    "idle_timeout_s": (int, float),
    "max_chunk_frames": int,
    "max_buffered_frames": int,
    "max_output_backlog": int,
    "slow_consumer_timeout_s": (int, float),
    "buckets": list,
    "device": str,
}
MODEL_KEYS: dict[str, type | tuple[type, ...]] = {"path": str, "builtin": str, **SCHEDULER_KEYS}


class ConfigFileError(Exception):
    """An invalid server config file; the message has path, line and reason."""


@dataclasses.dataclass
class ModelEntry:
    name: str
    path: str | None
    builtin: str | None
    scheduler: dict[str, Any]


@dataclasses.dataclass
class FileConfig:
    server: dict[str, Any]
    defaults: dict[str, Any]
    models: list[ModelEntry]


def load_config_file(path: str | Path) -> FileConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigFileError(f"{path}: cannot read: {e.strerror}") from e
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"{path}: {e}") from e

    def fail(table: str, key: str | None, reason: str) -> ConfigFileError:
        return ConfigFileError(f"{path}:{_line_of(text, table, key)}: {reason}")

    for table in doc:
        if table not in ("server", "defaults", "models"):
            raise fail(
                table, None, f"unknown table [{table}]; use [server], [defaults], [models.NAME]."
            )
    server = _check_table(doc.get("server", {}), SERVER_KEYS, "server", fail)
    defaults = _check_table(doc.get("defaults", {}), SCHEDULER_KEYS, "defaults", fail)
    models = []
    for name, entry in doc.get("models", {}).items():
        table = f"models.{name}"
        if not isinstance(entry, dict):
            raise fail("models", name, f"models.{name} must be a table ([models.{name}]).")
        entry = _check_table(entry, MODEL_KEYS, table, fail)
        if ("path" in entry) == ("builtin" in entry):
            raise fail(table, None, f"[{table}] needs exactly one of `path` or `builtin`.")
        scheduler = {k: v for k, v in entry.items() if k in SCHEDULER_KEYS}
        models.append(ModelEntry(name, entry.get("path"), entry.get("builtin"), scheduler))
        if entry.get("path") and not Path(entry["path"]).is_absolute():
            # Relative model paths are relative to the config file.
            models[-1].path = str((path.parent / entry["path"]).resolve())
    return FileConfig(server, defaults, models)


def _check_table(
    table: dict[str, Any],
    allowed: dict[str, type | tuple[type, ...]],
    name: str,
    fail: Any,
) -> dict[str, Any]:
    for key, value in table.items():
        if key not in allowed:
            raise fail(name, key, f"unknown key `{key}` in [{name}]; known: {', '.join(allowed)}.")
        expected = allowed[key]
        if isinstance(value, bool) or not isinstance(value, expected):
            names = (
                " or ".join(t.__name__ for t in expected)
                if isinstance(expected, tuple)
                else expected.__name__
            )
            raise fail(name, key, f"`{key}` must be {names}, got {value!r}.")
        if key in ("max_streams", "chunk_blocks", "grpc_port", "http_port") and value <= 0:
            raise fail(name, key, f"`{key}` must be positive, got {value}.")
    return dict(table)


def _line_of(text: str, table: str, key: str | None) -> int:
    """Line number of `key` inside `[table]` (or of the table header)."""
    lines = text.splitlines()
    header = re.compile(r"^\s*\[\s*" + re.escape(table).replace(r"\.", r"\s*\.\s*") + r"\s*\]")
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        return 1
    if key is None:
        return start + 1
    key_re = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
    for i in range(start + 1, len(lines)):
        if lines[i].lstrip().startswith("["):
            break
        if key_re.match(lines[i]):
            return i + 1
    return start + 1


def scheduler_config(*layers: dict[str, Any]) -> SchedulerConfig:
    """Later dicts override earlier ones; None values are ignored."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    if "buckets" in merged:
        merged["buckets"] = tuple(int(b) for b in merged["buckets"])
    return SchedulerConfig(**merged)
