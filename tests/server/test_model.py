"""Model directories, built-in models and the offline CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import sequence_layers as sl
from sequence_layers import testing
from server.app.cli import models_main, offline_main
from server.errors import ModelLoadError
from server.model import ServableModel, init_variables, load_model_dir, save_model_dir


def _small(filters: int = 4) -> ServableModel:
    config = sl.Serial.Config(
        (
            sl.Conv1D.Config(filters=filters, kernel_size=3, padding="reverse_causal"),
            sl.LSTM.Config(units=3),
        )
    )
    return ServableModel(
        "small", config, init_variables(config, (2,), seed=3), (2,), description="test model"
    )


def test_model_dir_round_trip(tmp_path: Path) -> None:
    model = _small()
    save_model_dir(model, tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert doc["format"] == "sequence_layers_serving.model" and doc["version"] == 1
    loaded = load_model_dir(tmp_path / "m")
    assert loaded.config == model.config
    assert loaded.info() == model.info()
    x = np.random.default_rng(0).normal(size=(17, 2)).astype(np.float32)
    np.testing.assert_array_equal(loaded.offline(x), model.offline(x))
    for a, b in zip(
        jax.tree.leaves(loaded.variables), jax.tree.leaves(model.variables), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"model\.json is missing"):
        load_model_dir(tmp_path / "empty")

    save_model_dir(_small(), tmp_path / "m")
    meta = tmp_path / "m" / "model.json"
    doc = json.loads(meta.read_text())

    meta.write_text(json.dumps({**doc, "version": 99}))
    with pytest.raises(ModelLoadError, match="version 99 is not supported"):
        load_model_dir(tmp_path / "m")

    meta.write_text("{not json")
    with pytest.raises(ModelLoadError, match="invalid JSON at line 1"):
        load_model_dir(tmp_path / "m")

    # A checkpoint written for a different config: shapes disagree.
    save_model_dir(_small(filters=5), tmp_path / "other")
    meta.write_text(json.dumps(doc))
    shutil.rmtree(tmp_path / "m" / "params")
    shutil.copytree(tmp_path / "other" / "params", tmp_path / "m" / "params")
    with pytest.raises(ModelLoadError, match="has shape"):
        load_model_dir(tmp_path / "m")

    shutil.rmtree(tmp_path / "m" / "params")
    with pytest.raises(ModelLoadError, match="params is missing"):
        load_model_dir(tmp_path / "m")


def test_sl_offline_on_model_dir(tmp_path: Path) -> None:
    model = _small()
    save_model_dir(model, tmp_path / "m")
    x = np.random.default_rng(1).normal(size=(23, 2)).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    assert (
        offline_main([str(tmp_path / "m"), str(tmp_path / "in.npy"), str(tmp_path / "out.npy")])
        == 0
    )
    testing.assert_allclose(np.load(tmp_path / "out.npy"), model.offline(x))
    np.save(tmp_path / "bad.npy", np.zeros((5, 7), np.float32))
    assert (
        offline_main([str(tmp_path / "m"), str(tmp_path / "bad.npy"), str(tmp_path / "o.npy")]) == 2
    )


def test_sl_offline_console_script_on_builtin(tmp_path: Path) -> None:
    x = np.random.default_rng(2).normal(size=(4000,)).astype(np.float32) * 0.1
    np.save(tmp_path / "wave.npy", x)
    script = Path(sys.executable).parent / "sl-offline"
    proc = subprocess.run(
        [str(script), "logmel", str(tmp_path / "wave.npy"), str(tmp_path / "mel.npy")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    mel = np.load(tmp_path / "mel.npy")
    assert mel.ndim == 2 and mel.shape[1] == 80 and np.all(np.isfinite(mel))


def test_sl_models_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert models_main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("demo-asr", "demo-vocoder", "logmel"):
        assert name in out


def test_token_model_with_tied_embeddings_saves_loads_and_streams(tmp_path: Path) -> None:
    # A config-only model with tied input/output embeddings (the Embedding is
    # referred to by name), served with int32 token ids: the model directory
    # round-trips, and streaming through the Scheduler equals offline.
    import asyncio

    from server.runtime import Engine, Output, SchedulerConfig

    embed = sl.Embedding.Config(dimension=8, num_embeddings=11, name="embed")
    config = sl.Serial.Config(
        (
            embed,
            sl.Conv1D.Config(filters=8, kernel_size=3, padding="causal"),
            sl.EmbeddingTranspose.Config(embed),
        )
    )
    variables = init_variables(config, (), seed=3, input_dtype="int32")
    assert set(variables["params"]) == {"embed", "layers_1", "layers_2"}
    assert set(variables["params"]["layers_2"]) == {"bias"}  # the table is not copied
    model = ServableModel("tied", config, variables, (), input_dtype="int32")
    loaded = load_model_dir(save_model_dir(model, tmp_path / "tied"))
    assert loaded.config == config and loaded.input_dtype == "int32"
    ids = np.random.default_rng(0).integers(0, 11, size=(37,)).astype(np.int32)
    expected = model.offline(ids)
    np.testing.assert_allclose(loaded.offline(ids), expected, rtol=1e-6, atol=1e-6)
    assert expected.shape == (37, 11)  # logits over the 11 tokens

    sched = Engine(loaded, SchedulerConfig(max_streams=2, chunk_blocks=4, buckets=(2,)))
    sched.start()
    try:

        async def stream() -> np.ndarray:
            session = sched.open_stream(asyncio.get_running_loop())
            for i in range(0, len(ids), 5):
                session.send(ids[i : i + 5])
            session.end()
            frames = [o.frames async for o in session.outputs() if isinstance(o, Output)]
            return np.concatenate(frames)

        np.testing.assert_allclose(asyncio.run(stream()), expected, rtol=1e-5, atol=1e-5)
    finally:
        sched.stop()
