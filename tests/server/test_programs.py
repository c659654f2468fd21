"""Exported step programs (`sl-models export --programs`): a model directory
that serves without its layer code, equal to offline; platform mismatch and
broken artifacts give clear errors or a logged fall-back to the code."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import sequence_layers as sl
from clients.client import AsyncGrpcClient, AsyncWebSocketClient, chunked, collect
from sequence_layers import testing
from server.app.cli import models_main
from server.errors import ModelLoadError
from server.model import ServableModel, init_variables, load_model_dir, save_model_dir
from server.programs import ExportedProgram, LayerProgram
from server.runtime import Engine, SchedulerConfig
from tests.server.serving import running_server
from tests.server.streaming import drive

# A stateful layer with a parameter, in a module only this test process can
# import: the server process never sees this file.
CUSTOM_LAYER = '''
import dataclasses

import jax.numpy as jnp

import sequence_layers as sl
from sequence_layers import testing
from sequence_layers import types


class LeakySum(types.PreservesType, types.PreservesShape, types.SequenceLayer):
    """y[t] = d * y[t-1] + x[t] over valid frames; d a learned scalar."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        name: str | None = None

        def make(self) -> "LeakySum":
            return LeakySum(self, name=self.name)

    config: Config

    @property
    def receptive_field_per_step(self):
        return {0: (-float("inf"), 0)}

    def setup(self):
        self.decay = self.param("decay", lambda key: jnp.full((1,), 0.8, jnp.float32))

    def _scan(self, x, h):
        x = x.mask_invalid()
        d = jnp.tanh(self.decay)
        outs = []
        for t in range(x.shape[1]):
            h = jnp.where(x.mask[:, t, None], d * h + x.values[:, t], h)
            outs.append(h)
        return sl.Sequence(jnp.stack(outs, 1), x.mask).mask_invalid(), h

    @types.check_layer
    def layer(self, x, *, training, constants=None):
        h = jnp.zeros((x.shape[0], *x.channel_shape), x.dtype)
        return self._scan(x, h)[0]

    def get_initial_state(self, batch_size, input_spec, *, training, constants=None):
        return jnp.zeros((batch_size, *input_spec.shape), input_spec.dtype)

    @types.check_step
    def step(self, x, state, *, training, constants=None):
        return self._scan(x, state)


sl.serialization.register_type(LeakySum.Config, name="test_only.LeakySum")
'''


def _custom_module(tmp_path: Path) -> ModuleType:
    if "custom_layers_only_here" in sys.modules:  # its type registers once a process
        return sys.modules["custom_layers_only_here"]
    path = tmp_path / "custom_layers_only_here.py"
    path.write_text(textwrap.dedent(CUSTOM_LAYER))
    spec = importlib.util.spec_from_file_location("custom_layers_only_here", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _custom_model(tmp_path: Path) -> ServableModel:
    custom = _custom_module(tmp_path)
    config = sl.Serial.Config(
        (
            sl.Conv1D.Config(filters=4, kernel_size=3, padding="reverse_causal"),
            custom.LeakySum.Config(),
            sl.Conv1D.Config(filters=3, kernel_size=2, strides=2, padding="causal"),
        )
    )
    return ServableModel("custom", config, init_variables(config, (2,), seed=5), (2,))


def _stream_all(model: ServableModel, inputs: list[np.ndarray]) -> list[np.ndarray]:
    sched = Engine(model, SchedulerConfig(max_streams=4, chunk_blocks=3, buckets=(2, 4)))
    sched.start()
    try:

        async def run() -> list[np.ndarray]:
            loop = asyncio.get_running_loop()
            rng = np.random.default_rng(4)
            out = await asyncio.gather(
                *[
                    drive(lambda: sched.open_stream(loop), x, rng, 9, model.output_spec.shape)
                    for x in inputs
                ]
            )
            return [y for y, _ in out]

        return asyncio.run(run())
    finally:
        sched.stop()


def test_exported_model_streams_like_its_layer(tmp_path: Path) -> None:
    model = _custom_model(tmp_path)
    path = save_model_dir(model, tmp_path / "m", programs=True)
    doc = json.loads((path / "model.json").read_text())
    assert doc["version"] == 2 and doc["programs"]["platforms"] == ["cpu"]
    assert doc["programs"]["signature"]["input_latency"] == model.info().input_latency == 2
    loaded = load_model_dir(path)
    assert isinstance(loaded.program, ExportedProgram)
    assert loaded.info() == model.info()
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(n, 2)).astype(np.float32) for n in (1, 17, 40)]
    for x, y in zip(inputs, _stream_all(loaded, inputs), strict=True):
        testing.assert_allclose(y, model.offline(x))
    # Without layer code, offline runs the programs (the contract's step form).
    loaded.layer = None
    for x in inputs:
        testing.assert_allclose(loaded.offline(x), model.offline(x))


def test_programs_for_another_platform(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = _custom_model(tmp_path)
    path = save_model_dir(model, tmp_path / "m", programs=True)
    meta = path / "model.json"
    doc = json.loads(meta.read_text())
    meta.write_text(json.dumps({**doc, "programs": {**doc["programs"], "platforms": ["tpu"]}}))
    # The layer code is importable here: served from it, with a warning.
    loaded = load_model_dir(path)
    assert isinstance(loaded.program, LayerProgram)
    assert "exported for tpu, this server runs on cpu" in caplog.text
    # Config names a type nobody can import: no way to serve, and it says why.
    config = json.dumps(doc["config"]).replace("test_only.LeakySum", "gone.LeakySum")
    meta.write_text(
        json.dumps(
            {
                **doc,
                "config": json.loads(config),
                "programs": {**doc["programs"], "platforms": ["tpu"]},
            }
        )
    )
    with pytest.raises(ModelLoadError, match=r"exported for tpu.*cannot be served instead"):
        load_model_dir(path)
    # Programs alone serve (the config is not needed).
    meta.write_text(json.dumps({**doc, "config": json.loads(config)}))
    assert isinstance(load_model_dir(path).program, ExportedProgram)


def test_broken_artifacts_are_refused_clearly(tmp_path: Path) -> None:
    path = save_model_dir(_custom_model(tmp_path), tmp_path / "m", programs=True)
    (path / "programs" / "step.jax").write_bytes(b"not a flatbuffer")
    with pytest.raises(ModelLoadError, match="unreadable exported programs"):
        load_model_dir(path)
    (path / "programs" / "step.jax").unlink()
    with pytest.raises(ModelLoadError, match=r"step\.jax is missing"):
        load_model_dir(path)


def test_sl_models_export_programs_from_a_builtin(tmp_path: Path) -> None:
    assert models_main(["export", "--programs", "logmel", str(tmp_path / "logmel")]) == 0
    loaded = load_model_dir(tmp_path / "logmel")
    assert isinstance(loaded.program, ExportedProgram)
    x = (np.random.default_rng(1).normal(size=(3000, 1)) * 0.1).astype(np.float32)
    testing.assert_allclose(loaded.offline(x), ServableModel.offline(loaded, x))
    assert models_main(["export", "no-such-model", str(tmp_path / "x")]) == 2


@pytest.mark.e2e
def test_server_without_the_layer_code_serves_exported_programs(tmp_path: Path) -> None:
    model = _custom_model(tmp_path)
    path = save_model_dir(model, tmp_path / "custom", programs=True)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(61, 2)).astype(np.float32)
    expected = model.offline(x)
    args = ["--model", f"custom={path}", "--max-streams", "4", "--buckets", "4"]
    with running_server(args) as server:

        async def both() -> tuple[np.ndarray, np.ndarray]:
            async with AsyncGrpcClient(server.grpc_target) as grpc_client:
                g, _ = await collect(grpc_client.stream("custom", chunked(x, 7)))
            async with AsyncWebSocketClient(server.ws_url) as ws_client:
                w, _ = await collect(ws_client.stream("custom", chunked(x, 5)))
            assert g is not None and w is not None
            return g, w

        via_grpc, via_ws = asyncio.run(both())
    testing.assert_allclose(via_grpc, expected)
    testing.assert_allclose(via_ws, expected)
