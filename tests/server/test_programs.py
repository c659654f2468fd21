"""Exported step programs (`sl-models export --programs`): a model directory
that serves without its layer code, equal to offline; platform mismatch and
broken artifacts give clear errors or a logged fall-back to the code."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import jax
import numpy as np
import pytest

import sequence_layers as sl
from clients.client import AsyncGrpcClient, AsyncWebSocketClient, chunked, collect
from sequence_layers import testing
from server import compile_cache, programs
from server.app.cli import models_main
from server.errors import ModelLoadError
from server.model import ServableModel, init_variables, load_model_dir, save_model_dir
from server.programs import ExportedProgram, LayerProgram, export_in_memory
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


# The traced cache: a warm start reads the exported step back instead of
# tracing the layer code; a changed layer never loads a stale one.


@pytest.fixture
def traced_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "traced"
    monkeypatch.setattr(compile_cache, "traced_dir", directory)
    return directory


def _step_outputs(program: ExportedProgram, model: ServableModel) -> list[np.ndarray]:
    x = np.random.default_rng(3).normal(size=(2, model.block_size, 2)).astype(np.float32)
    mask = np.array([[True] * model.block_size, [False] * model.block_size])
    state = program.initial_state(model.variables, 2)
    state, y, y_mask = program.step(model.variables, state, x * mask[..., None], mask)
    return [np.asarray(a) for a in (*state, y, y_mask)]


def test_warm_export_reads_the_step_back_without_tracing(
    tmp_path: Path, traced_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _custom_model(tmp_path)
    fresh = export_in_memory(model.layer, model.variables, model.input_spec)
    (entry,) = traced_cache.glob("export-*.bin")
    # The layer code is not traced again: a second export must come from disk.
    monkeypatch.setattr(programs, "_export", lambda *a: pytest.fail("traced again"))
    cached = export_in_memory(model.layer, model.variables, model.input_spec)
    assert cached.step_artifact.serialize() == fresh.step_artifact.serialize()
    assert cached.signature == fresh.signature
    for a, b in zip(_step_outputs(cached, model), _step_outputs(fresh, model), strict=True):
        np.testing.assert_array_equal(a, b)
    # Other variables (a wider conv) are another key: traced, not the stale entry.
    monkeypatch.undo()
    monkeypatch.setattr(compile_cache, "traced_dir", traced_cache)
    config = dataclasses.replace(
        model.config,
        layers=(sl.Conv1D.Config(5, 3, padding="reverse_causal"), *model.config.layers[1:]),
    )
    other = ServableModel("other", config, init_variables(config, (2,)), (2,))
    export_in_memory(other.layer, other.variables, other.input_spec)
    assert len(list(traced_cache.glob("export-*.bin"))) == 2 and entry.exists()


def test_the_server_exports_its_whole_chunk_as_one_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step the server compiles takes a whole chunk in one call (called
    once per block, a 4-block demo-asr tick took 1.85x the bare step), and
    equals stepping the chunk block by block."""
    model = _custom_model(tmp_path)
    b = model.block_size
    per_block = export_in_memory(model.layer, model.variables, model.input_spec)
    per_chunk = export_in_memory(model.layer, model.variables, model.input_spec, frames=3 * b)
    assert (per_block.frames, per_chunk.frames) == (b, 3 * b)
    with pytest.raises(ValueError, match="multiple of the block size"):
        export_in_memory(model.layer, model.variables, model.input_spec, frames=b + 1)

    calls = {"per_block": 0, "per_chunk": 0}
    for name, program in (("per_block", per_block), ("per_chunk", per_chunk)):
        artifact = program.step_artifact

        class Counted:
            def __init__(self, name: str, artifact: object) -> None:
                self.name, self.artifact = name, artifact

            def call(self, *args: object) -> object:
                calls[self.name] += 1
                return self.artifact.call(*args)  # type: ignore[attr-defined]

        monkeypatch.setattr(program, "step_artifact", Counted(name, artifact))
    x = np.random.default_rng(3).normal(size=(2, 3 * b, 2)).astype(np.float32)
    mask = np.ones((2, 3 * b), bool)
    mask[1, b + 1 :] = False  # a chunk tail: valid frames a prefix
    x *= mask[..., None]
    outs = []
    for program in (per_block, per_chunk):
        state = program.initial_state(model.variables, 2)
        state, y, y_mask = program.step(model.variables, state, x, mask)
        outs.append([np.asarray(a) for a in (*state, y, y_mask)])
    assert calls == {"per_block": 3, "per_chunk": 1}
    for a, c in zip(*outs, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)


def test_changed_code_is_a_new_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _custom_model(tmp_path)
    key = compile_cache.trace_key(model.config, "x")
    assert key is not None and compile_cache.trace_key(model.config, "x") == key
    assert compile_cache.trace_key(model.config, "y") != key
    # The custom layer's module is outside the library: its source is in the key.
    source = Path(sys.modules["custom_layers_only_here"].__file__ or "")
    text = source.read_text()
    source.write_text(text + "\n# edited\n")
    try:
        assert compile_cache.trace_key(model.config, "x") != key
    finally:
        source.write_text(text)
    assert compile_cache.trace_key(model.config, "x") == key
    # An edit to the library (or a jax upgrade) changes its fingerprint.
    monkeypatch.setattr(compile_cache, "library_fingerprint", lambda: "edited")
    assert compile_cache.trace_key(model.config, "x") != key
    # A trace-time setting too.
    monkeypatch.undo()
    with jax.default_matmul_precision("bfloat16"):
        assert compile_cache.trace_key(model.config, "x") != key


def test_configs_the_key_cannot_see_into_are_not_cached() -> None:
    # A registered callable closing over a value: the key cannot see `scale`.
    scale = 3.0
    sl.serialization.register_callable("test_only.scaled", lambda x: x * scale)
    doc = {"format": "sequence_layers.config", "version": 1}
    activation = sl.serialization.from_dict({**doc, "config": {"callable": "test_only.scaled"}})
    assert compile_cache.trace_key(sl.Dense.Config(4, activation=activation)) is None
    assert compile_cache.trace_key(sl.Dense.Config(4)) is not None
    assert compile_cache.trace_key(None) is None


def test_damaged_entries_are_traced_again(
    tmp_path: Path, traced_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _custom_model(tmp_path)
    expected = _step_outputs(
        export_in_memory(model.layer, model.variables, model.input_spec), model
    )
    (entry,) = traced_cache.glob("export-*.bin")
    key = entry.name.removeprefix("export-").removesuffix(".bin")
    good = entry.read_bytes()
    for damage in (good[:-100], good[:40] + bytes([good[40] ^ 1]) + good[41:], b"junk"):
        entry.write_bytes(damage)
        again = export_in_memory(model.layer, model.variables, model.input_spec)
        for a, b in zip(_step_outputs(again, model), expected, strict=True):
            np.testing.assert_array_equal(a, b)
        assert "is damaged; tracing instead" in caplog.text
        assert compile_cache.read_traced("export", key) is not None  # rewritten whole
        caplog.clear()
    # A sound entry that does not deserialize: logged, traced, rewritten.
    compile_cache.write_traced("export", key, bytes(8) + b"not a flatbuffer")
    export_in_memory(model.layer, model.variables, model.input_spec)
    assert "unreadable exported step" in caplog.text
    assert len(compile_cache.read_traced("export", key) or b"") > 1000


def test_variable_shapes_come_back_from_the_cache(
    tmp_path: Path, traced_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _custom_model(tmp_path).config
    fresh = init_variables(config, (2,), seed=7)
    assert len(list(traced_cache.glob("variables-*.bin"))) == 1
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: pytest.fail("traced again"))
    cached = init_variables(config, (2,), seed=7)
    assert jax.tree.structure(cached) == jax.tree.structure(fresh)
    for a, b in zip(jax.tree.leaves(cached), jax.tree.leaves(fresh), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


# Ready first: a model serves once its largest bucket is compiled.


class _FakeLowered:
    def __init__(self, key: object, log: list[object]) -> None:
        self.key, self.log = key, log

    def compile(self) -> str:
        self.log.append(("compile", self.key))
        return f"program {self.key}"
