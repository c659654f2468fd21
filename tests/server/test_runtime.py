"""`Runtime`: per-model readiness (each model serves once its own programs are
compiled) and the states `/v1/models` reports."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

import sequence_layers as sl
from sequence_layers import testing
from server import compile_cache
from server.errors import Unavailable
from server.model import ServableModel, init_variables
from server.runtime import Output, Runtime, SchedulerConfig


def _model(name: str, filters: int) -> ServableModel:
    config = sl.Serial.Config(
        (
            sl.Conv1D.Config(filters=filters, kernel_size=3, padding="causal"),
            sl.LSTM.Config(units=3),
        )
    )
    return ServableModel(name, config, init_variables(config, (2,), seed=2), (2,))


def test_each_model_serves_as_soon_as_it_is_compiled() -> None:
    runtime = Runtime(
        {"big": _model("big", 16), "small": _model("small", 2)},
        SchedulerConfig(max_streams=2, buckets=(2,)),
    )
    assert runtime.model_state("big") == runtime.model_state("small") == "compiling"
    assert not runtime.ready

    async def refused() -> None:
        runtime.open_stream("small")

    with pytest.raises(Unavailable, match="still compiling"):
        asyncio.run(refused())

    # Hold "big" back in its compile until "small" has served a stream.
    release_big = threading.Event()
    small_ready = threading.Event()
    big = runtime.engines["big"]
    compile_big = big.start

    def held_start() -> None:
        assert release_big.wait(120)
        compile_big()

    big.start = held_start  # type: ignore[method-assign]
    ready_order: list[str] = []

    def on_ready(name: str) -> None:
        assert runtime.model_state(name) == "ready"
        ready_order.append(name)
        if name == "small":
            small_ready.set()

    starter = threading.Thread(target=runtime.start, args=(on_ready,))
    starter.start()
    try:
        assert small_ready.wait(120)
        assert runtime.model_state("big") == "compiling" and not runtime.ready

        async def stream() -> np.ndarray:
            session = runtime.open_stream("small")
            session.send(np.ones((5, 2), np.float32))
            session.end()
            outputs = [o async for o in session.outputs()]
            return np.concatenate([o.frames for o in outputs if isinstance(o, Output)])

        y = asyncio.run(stream())
        expected = runtime.engines["small"].model.offline(np.ones((5, 2), np.float32))
        testing.assert_allclose(y, expected)
        release_big.set()
        starter.join(120)
        assert ready_order == ["small", "big"] and runtime.ready
        runtime.drain()
        assert runtime.model_state("big") == "draining" and not runtime.ready
    finally:
        release_big.set()
        starter.join(120)
        runtime.stop()


def test_compile_cache_directory_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_cache_dir() == str(
        tmp_path / "xdg" / "sequence-layers-serving" / "jax"
    )
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.default_cache_dir() == str(tmp_path / "env")
    assert compile_cache.enable_compile_cache("off") is None
    # Not writable (a file where a directory should be): served uncached, with a warning.
    (tmp_path / "file").write_text("")
    assert compile_cache.enable_compile_cache(str(tmp_path / "file" / "jax")) is None
    assert "compile cache disabled" in caplog.text
