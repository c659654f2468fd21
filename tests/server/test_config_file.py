"""`sl-serve --config`: per-model knobs, flags override the file, errors name the line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.app.config_file import ConfigFileError, load_config_file
from server.app.settings import build_parser, resolve_settings

pytestmark = pytest.mark.e2e  # starts server processes: not in `make test-fast`

GOOD = """
[server]
grpc_port = 6000
drain_seconds = 3.5

[defaults]
max_streams = 8
max_batch_delay_ms = 2

[models.mel]
builtin = "logmel"
max_streams = 4
chunk_blocks = 3
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_file_models_defaults_and_flag_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    args = build_parser().parse_args(["--config", str(path), "--max-batch-delay-ms", "7"])
    settings = resolve_settings(args)
    assert list(settings.models) == ["mel"]
    assert settings.models["mel"].name == "mel"
    sched = settings.schedulers["mel"]
    assert (sched.max_streams, sched.chunk_blocks, sched.max_batch_delay_ms) == (4, 3, 7)
    assert settings.server["grpc_port"] == 6000 and settings.server["http_port"] == 8080
    assert settings.server["drain_seconds"] == 3.5

    args = build_parser().parse_args(["--config", str(path), "--grpc-port", "7000"])
    assert resolve_settings(args).server["grpc_port"] == 7000


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        (
            "[server]\ngrpc_port = 1\n\n[models.a]\nbuiltin = 'logmel'\nmax_streams = 'many'\n",
            6,
            "`max_streams` must be int",
        ),
        ("[server]\nport = 1\n", 2, "unknown key `port`"),
        ("[defaults]\nmax_streams = 0\n", 2, "must be positive"),
        ("[models.a]\nmax_streams = 3\n", 1, "exactly one of `path` or `builtin`"),
        ("[server]\nhost = \n", 2, "line 2"),
        ("[extra]\n", 1, "unknown table"),
    ],
)
def test_invalid_files_name_line_and_reason(
    tmp_path: Path, text: str, line: int, reason: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigFileError) as info:
        load_config_file(path)
    message = str(info.value)
    assert str(path) in message and reason in message
    if "line" not in reason:
        assert f"{path}:{line}:" in message


def test_sl_serve_refuses_a_bad_file_before_starting(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server]\ngrpc_port = 'x'\n")
    script = Path(sys.executable).parent / "sl-serve"
    proc = subprocess.run(
        [str(script), "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert f"{path}:2: `grpc_port` must be int" in proc.stderr


def test_every_knob_is_a_flag_and_a_file_key(tmp_path: Path) -> None:
    # Flags and file keys are generated from the settings fields: each one
    # reaches the SchedulerConfig / server settings, file < flag.
    import dataclasses

    from server.runtime import SchedulerConfig

    path = _write(
        tmp_path,
        "[server]\ncompile_cache_dir = 'off'\n\n[defaults]\nshard = false\n"
        "max_chunk_frames = 100\nbuckets = [2, 8]\n\n[models.mel]\nbuiltin = 'logmel'\n"
        "max_buffered_frames = 900\n",
    )
    flags = ["--config", str(path), "--max-chunk-frames", "50", "--slow-consumer-timeout-s", "2"]
    settings = resolve_settings(build_parser().parse_args(flags))
    sched = settings.schedulers["mel"]
    assert (sched.shard, sched.max_chunk_frames, sched.buckets) == (False, 50, (2, 8))
    assert (sched.max_buffered_frames, sched.slow_consumer_timeout_s) == (900, 2.0)
    assert settings.server["compile_cache_dir"] == "off"
    args = build_parser().parse_args(["--no-shard", "--buckets", "1,4", "--device", "cpu:0"])
    for field in dataclasses.fields(SchedulerConfig):
        assert hasattr(args, field.name), field.name
    assert (args.shard, args.buckets, args.device) == (False, (1, 4), "cpu:0")
    bad = _write(tmp_path, "[defaults]\nshard = 1\n")
    with pytest.raises(ConfigFileError, match="`shard` must be bool"):
        load_config_file(bad)


def test_admin_key_file_from_the_file_or_a_flag(tmp_path: Path) -> None:
    keys = tmp_path / "admin-keys"
    keys.write_text("# rotate: new key first\nnew-key\n\n  old-key  \n")
    path = _write(
        tmp_path, f"[server]\nadmin_key_file = '{keys}'\n\n[models.mel]\nbuiltin = 'logmel'\n"
    )
    settings = resolve_settings(build_parser().parse_args(["--config", str(path)]))
    assert settings.admin_keys == ["new-key", "old-key"]
    assert settings.api_keys == []  # admin keys are not API keys
    other = tmp_path / "other-keys"
    other.write_text("flag-key\n")
    args = build_parser().parse_args(["--config", str(path), "--admin-key-file", str(other)])
    assert resolve_settings(args).admin_keys == ["flag-key"]
    other.write_text("# no key yet\n\n")
    with pytest.raises(ValueError, match="no key in it"):
        resolve_settings(
            build_parser().parse_args(["--config", str(path), "--admin-key-file", str(other)])
        )


def test_xla_cpu_threads_from_the_flag_else_the_environment_else_all_cpus_but_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from jax._src import xla_bridge

    from server import cpus
    from server.app import settings as app_settings

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda root: None)
    for name in ("PJRT_NPROC", "NPROC"):
        # Recorded first, so whatever the code under test sets is undone.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert app_settings.default_xla_cpu_threads() == 3
    assert app_settings.configure_xla_cpu_threads(None) == 3
    assert app_settings.os.environ["PJRT_NPROC"] == "3"
    # The operator's environment stays unless the flag says otherwise.
    monkeypatch.delenv("PJRT_NPROC")
    monkeypatch.setenv("NPROC", "2")
    assert app_settings.configure_xla_cpu_threads(None) is None
    assert "PJRT_NPROC" not in app_settings.os.environ
    assert app_settings.configure_xla_cpu_threads(5) == 5
    assert app_settings.os.environ["PJRT_NPROC"] == "5"
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0})
    assert app_settings.default_xla_cpu_threads() == 1
    # Too late once JAX's backend has started: it read the variable already.
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    monkeypatch.delenv("PJRT_NPROC")
    assert app_settings.configure_xla_cpu_threads(2) is None
    assert "PJRT_NPROC" not in app_settings.os.environ
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--xla-cpu-threads", "x"])
    args = build_parser().parse_args(["--xla-cpu-threads", "2", "--model", "logmel"])
    assert resolve_settings(args).server["xla_cpu_threads"] == 2


def test_available_cpus_are_capped_by_the_cgroup_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server import cpus

    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cpus.available_cpus(tmp_path) == 16  # no cgroup files: no quota
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.available_cpus(tmp_path) == 16
    (v1 / "cpu.cfs_quota_us").write_text("250000\n")  # a 2.5-CPU limit
    assert cpus.available_cpus(tmp_path) == 3
    (tmp_path / "cpu.max").write_text("max 100000\n")  # v2 wins where it exists
    assert cpus.available_cpus(tmp_path) == 16
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert cpus.available_cpus(tmp_path) == 1


def test_positive_knobs_are_refused_at_the_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # As a file's value is (`check_value`): `--max-streams 0` used to start
    # and fail in the first tick with an IndexError.
    parser = build_parser()
    for flag in ("--max-streams", "--chunk-blocks", "--xla-cpu-threads", "--grpc-port"):
        with pytest.raises(SystemExit):
            parser.parse_args([flag, "0"])
        assert f"argument {flag}: must be positive, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-streams", "x"])
    assert "invalid int value: 'x'" in capsys.readouterr().err
    args = parser.parse_args(["--max-streams", "3", "--max-batch-delay-ms", "0"])
    assert (args.max_streams, args.max_batch_delay_ms) == (3, 0.0)
