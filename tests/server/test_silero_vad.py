"""Silero VAD with the official weights equals the official runtime (the
wheel's stock `silero_vad.onnx` in ONNX Runtime, stepped frame by frame) on
real speech mixed with silence, noise and tones: `layer()` and `step()` in
random block sizes. Import errors say what is wrong and how to fix it."""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

import sequence_layers as sl
from server import silero_vad
from server.app.cli import models_main
from server.errors import ModelLoadError
from server.model import ServableModel, load_model_dir
from tests.server.vad_audio import onnx_probs, speech_mix, wheel_or_skip

# float32 through an LSTM over ~300 windows against ONNX Runtime's float32:
# measured differences are ~1e-6; probabilities lie in [0, 1].
ATOL, RTOL = 1e-4, 1e-4


@functools.cache
def _model() -> ServableModel:
    return silero_vad.build()


@pytest.fixture(scope="module")
def wheel() -> Path:
    return wheel_or_skip()


@pytest.mark.parametrize("seed", [0, 1])
def test_layer_equals_onnx_runtime(wheel: Path, seed: int) -> None:
    x = speech_mix(seed)
    expected = onnx_probs(wheel, x)
    y = _model().offline(x[:, None])
    assert y.shape == (len(expected), 1) and y.dtype == np.float32
    np.testing.assert_allclose(y[:, 0], expected, rtol=RTOL, atol=ATOL)
    # Real speech and real silence: the comparison covers both ends.
    assert expected.max() > 0.9 and expected.min() < 0.05


def test_step_in_random_blocks_equals_onnx_runtime(wheel: Path) -> None:
    x = speech_mix(2)
    expected = onnx_probs(wheel, x)
    model = _model()
    layer = model.layer
    step = jax.jit(lambda v, x, s: layer.apply(v, x, s, training=False, method=layer.step))
    # The server's end-of-stream rule: `input_latency` (511) invalid samples,
    # then invalid samples up to whole blocks.
    padded = np.pad(x, (0, layer.input_latency))
    padded = np.pad(padded, (0, -len(padded) % 512))
    mask = np.arange(len(padded)) < len(x)
    state = layer.apply(
        model.variables, 1, model.input_spec, training=False, method=layer.get_initial_state
    )
    rng = np.random.default_rng(3)
    outputs, i = [], 0
    while i < len(padded):
        n = min(512 * int(rng.integers(1, 4)), len(padded) - i)  # 1 to 3 windows per step
        block = sl.Sequence(padded[None, i : i + n, None], mask[None, i : i + n])
        y, state = step(model.variables, block, state)
        outputs.append(np.asarray(y.values[0, :, 0])[np.asarray(y.mask[0])])
        i += n
    got = np.concatenate(outputs)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_import_writes_a_model_directory(wheel: Path, tmp_path: Path) -> None:
    assert models_main(["import", "silero-vad", str(tmp_path / "vad")]) == 0
    loaded = load_model_dir(tmp_path / "vad")
    assert loaded.name == "silero-vad" and loaded.sample_rate == 16000
    info = loaded.info()
    assert (info.input_shape, info.output_shape, info.block_size) == ((1,), (1,), 512)
    x = speech_mix(0)[:20000]
    np.testing.assert_allclose(
        loaded.offline(x[:, None]), _model().offline(x[:, None]), rtol=0, atol=1e-7
    )


def _fake_wheel(path: Path, version: str, onnx_bytes: bytes | None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            f"silero_vad-{version}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: silero-vad\nVersion: {version}\n",
        )
        if onnx_bytes is not None:
            z.writestr(silero_vad.ONNX_MEMBER, onnx_bytes)
    return path


def test_import_errors_are_clear(wheel: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="missing: run `make silero-vad`"):
        silero_vad.find_wheel(tmp_path / "nope.whl")
    old = _fake_wheel(tmp_path / "old.whl", "5.1.2", b"")
    with pytest.raises(ModelLoadError, match=r"silero-vad 5\.1\.2; the importer knows .*6\.2\.3"):
        silero_vad.read_weights(old)
    empty = _fake_wheel(tmp_path / "empty.whl", silero_vad.VERSION, None)
    with pytest.raises(ModelLoadError, match="not a silero-vad wheel"):
        silero_vad.read_weights(empty)
    assert models_main(["import", "silero-vad", str(tmp_path / "x"), "--wheel", str(old)]) == 2

    weights = silero_vad.read_weights(wheel)
    renamed = dict(weights)
    renamed["model.decoder.rnn.weight_ih_l0"] = renamed.pop("model.decoder.rnn.weight_ih")
    with pytest.raises(ModelLoadError, match=r"lacks tensors .*weight_ih"):
        silero_vad.to_variables(renamed)
    reshaped = dict(weights)
    reshaped["model.encoder.1.reparam_conv.weight"] = np.zeros((64, 128, 5), np.float32)
    with pytest.raises(ModelLoadError, match=r"encoder\.1\.reparam_conv\.weight has shape"):
        silero_vad.to_variables(reshaped)


def test_defaults_without_the_wheel_serve_the_rest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from server import defaults
    from server.app import settings as serve

    monkeypatch.setattr(silero_vad, "MODEL_DIR", tmp_path / "models" / "silero-vad")
    monkeypatch.setattr(silero_vad, "BUILD_DIR", tmp_path)
    monkeypatch.delenv("SL_SILERO_VAD_WHEEL", raising=False)
    builtins = {"logmel": defaults.logmel, "silero-vad": defaults.silero_vad}
    monkeypatch.setattr(serve, "BUILTIN_MODELS", builtins)
    models = serve.load_models([])
    assert sorted(models) == ["logmel"]
    err = capsys.readouterr().err
    assert "not serving silero-vad" in err and "make silero-vad" in err
    # Asked for by name, it is an error that says how to get it.
    with pytest.raises(ModelLoadError, match="make silero-vad"):
        serve.load_models(["silero-vad"])
