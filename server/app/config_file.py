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

The keys of `[server]` are the fields of `server.settings.ServerSettings`;
those of `[defaults]` and `[models.NAME]` the fields of
`server.runtime.SchedulerConfig` (each also an `sl-serve` flag, with its
help in `sl-serve --help`). Command-line flags override the file. Errors name
the file, the line and the reason, and stop the server before it starts.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

from server.runtime import SchedulerConfig
from server.settings import ServerSettings, check_value, keys, merge

# Keys and their types come from the settings dataclasses (server/settings.py).
MODEL_ONLY_KEYS = ("path", "builtin")


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
    server = _check_table(doc.get("server", {}), ServerSettings, "server", fail)
    defaults = _check_table(doc.get("defaults", {}), SchedulerConfig, "defaults", fail)
    models = []
    for name, entry in doc.get("models", {}).items():
        table = f"models.{name}"
        if not isinstance(entry, dict):
            raise fail("models", name, f"models.{name} must be a table ([models.{name}]).")
        for key in MODEL_ONLY_KEYS:
            if key in entry and not isinstance(entry[key], str):
                raise fail(table, key, f"`{key}` must be str, got {entry[key]!r}.")
        scheduler = {k: v for k, v in entry.items() if k not in MODEL_ONLY_KEYS}
        _check_table(scheduler, SchedulerConfig, table, fail, extra=MODEL_ONLY_KEYS)
        if ("path" in entry) == ("builtin" in entry):
            raise fail(table, None, f"[{table}] needs exactly one of `path` or `builtin`.")
        models.append(ModelEntry(name, entry.get("path"), entry.get("builtin"), scheduler))
        if entry.get("path") and not Path(entry["path"]).is_absolute():
            # Relative model paths are relative to the config file.
            models[-1].path = str((path.parent / entry["path"]).resolve())
    return FileConfig(server, defaults, models)


def _check_table(
    table: dict[str, Any],
    settings: type,
    name: str,
    fail: Any,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    for key, value in table.items():
        problem = check_value(settings, key, value)
        if problem is not None and problem.startswith("unknown key"):
            known = ", ".join([*extra, *keys(settings)])
            problem = f"unknown key `{key}` in [{name}]; known: {known}"
        if problem is not None:
            raise fail(name, key, problem + ".")
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
    return merge(SchedulerConfig, *layers)
