"""Silero VAD: the official weights imported into `examples.silero_vad()`.

The `silero-vad` wheel on PyPI (MIT licence) ships the official ONNX models.
We read the weights from `silero_vad_16k_op15.onnx` (16 kHz, the same
numbers as the stock `silero_vad.onnx`; the wheel's `.safetensors` holds
different ones) with the `onnx` package; torch is never needed. The wheel is
fetched on its own by `make silero-vad` into `build/` (`pip download
--no-deps silero-vad==6.2.3`).

Importing someone else's checkpoint follows the same pattern (`WEIGHT_MAP`
below): one row per source tensor naming the parameter it fills and the
transform between the two layouts (PyTorch convs are `[out, in, k]`, ours
`[k, in, out]`; PyTorch linear maps are `[out, in]`, ours `[in, out]`), then
a check that every parameter was filled with the shape `init` gives it.
"""

from __future__ import annotations

import email.parser
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sequence_layers.examples import silero_vad
from server.errors import ModelLoadError
from server.model import ServableModel, init_variables, load_model_dir, save_model_dir

NAME = "silero-vad"
VERSION = "6.2.3"
WHEEL = f"silero_vad-{VERSION}-py3-none-any.whl"
ONNX_MEMBER = "silero_vad/data/silero_vad_16k_op15.onnx"
ROOT = Path(__file__).resolve().parents[1]
# Where `make silero-vad` puts the wheel and the imported model directory; an
# installed server (the Docker image) names its imported directory instead.
BUILD_DIR = ROOT / "build"
MODEL_DIR = Path(os.environ.get("SL_SILERO_VAD_DIR") or BUILD_DIR / "models" / NAME)
FETCH_HINT = (
    f"run `make silero-vad` (downloads {WHEEL} from PyPI into build/ and imports it), or "
    f"`pip download --no-deps silero-vad=={VERSION} -d build` where PyPI is reachable"
)
DESCRIPTION = (
    "Silero VAD v6 (MIT), official weights: 16 kHz waveform -> speech probability per "
    "512-sample (32 ms) window. Streams speech_started/speech_stopped events on request."
)

Transform = Callable[[np.ndarray], np.ndarray]


def _conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 1, 0))  # PyTorch [out, in, k] -> [k, in, out]


def _linear(w: np.ndarray) -> np.ndarray:
    return np.transpose(w)  # PyTorch [out, in] -> [in, out]


_ENC = "encoder/child_layer"
# ONNX initializer -> (parameter path under `params`, its ONNX shape, transform).
# The two LSTM biases add up into our single `bias`; gate order is i, f, g, o
# in both.
WEIGHT_MAP: dict[str, tuple[str, tuple[int, ...], Transform]] = {
    "model.stft.forward_basis_buffer": (f"{_ENC}/stft/kernel", (258, 1, 256), _conv),
    **{
        f"model.encoder.{i}.reparam_conv.weight": (f"{_ENC}/encoder_{i}/kernel", shape, _conv)
        for i, shape in enumerate(((128, 129, 3), (64, 128, 3), (64, 64, 3), (128, 64, 3)))
    },
    **{
        f"model.encoder.{i}.reparam_conv.bias": (f"{_ENC}/encoder_{i}/bias", (n,), np.asarray)
        for i, n in enumerate((128, 64, 64, 128))
    },
    "model.decoder.rnn.weight_ih": ("lstm/kernel/kernel", (512, 128), _linear),
    "model.decoder.rnn.weight_hh": ("lstm/recurrent_kernel/kernel", (512, 128), _linear),
    "model.decoder.rnn.bias_ih": ("lstm/bias", (512,), np.asarray),
    "model.decoder.rnn.bias_hh": ("lstm/bias", (512,), np.asarray),
    "model.decoder.decoder.2.weight": ("decoder/kernel", (1, 128, 1), lambda w: w[:, :, 0].T),
    "model.decoder.decoder.2.bias": ("decoder/bias", (1,), np.asarray),
}


def find_wheel(path: str | os.PathLike[str] | None = None) -> Path:
    """The wheel to import from: `path`, `$SL_SILERO_VAD_WHEEL`, or build/."""
    candidate = path or os.environ.get("SL_SILERO_VAD_WHEEL") or BUILD_DIR / WHEEL
    wheel = Path(candidate)
    if not wheel.is_file():
        raise ModelLoadError(f"{wheel} is missing: {FETCH_HINT}.")
    return wheel


def read_weights(wheel: Path) -> dict[str, np.ndarray]:
    """The ONNX model's initializers, after checking the wheel's version."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise ModelLoadError(
            "importing Silero VAD reads its ONNX file with the `onnx` package: "
            "pip install -e '.[vad]' (make installs it)."
        ) from e
    try:
        with zipfile.ZipFile(wheel) as z:
            meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
            if meta["Name"] != "silero-vad" or meta["Version"] != VERSION:
                raise ModelLoadError(
                    f"{wheel} is {meta['Name']} {meta['Version']}; the importer knows "
                    f"silero-vad {VERSION} (its tensor names and shapes): {FETCH_HINT}."
                )
            proto = onnx.load_from_string(z.read(ONNX_MEMBER))
    except (zipfile.BadZipFile, StopIteration, KeyError) as e:
        raise ModelLoadError(f"{wheel} is not a silero-vad wheel with {ONNX_MEMBER}: {e}") from e
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def to_variables(weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """Maps the ONNX tensors onto the parameters of `silero_vad()`."""
    missing = sorted(set(WEIGHT_MAP) - set(weights))
    if missing:
        raise ModelLoadError(
            f"the ONNX model lacks tensors the importer maps: {missing}; its names changed "
            f"(a silero-vad other than {VERSION}?)."
        )
    flat: dict[str, np.ndarray] = {}
    for onnx_name, (path, shape, transform) in WEIGHT_MAP.items():
        w = np.asarray(weights[onnx_name], np.float32)
        if w.shape != shape:
            raise ModelLoadError(
                f"ONNX tensor {onnx_name} has shape {w.shape}, the importer expects {shape} "
                f"(a silero-vad other than {VERSION}?)."
            )
        value = transform(w)
        flat[path] = flat[path] + value if path in flat else value

    template = init_variables(silero_vad(), (1,))

    def fill(key_path: Any, leaf: jax.Array) -> np.ndarray:
        path = "/".join(str(getattr(k, "key", k)) for k in key_path[1:])
        if path not in flat:
            raise ModelLoadError(f"no ONNX tensor maps to parameter {path}.")
        value = np.ascontiguousarray(flat.pop(path), np.float32)
        if value.shape != tuple(leaf.shape):
            raise ModelLoadError(
                f"parameter {path}: mapped shape {value.shape} != model shape {tuple(leaf.shape)}."
            )
        return value

    variables = jax.tree_util.tree_map_with_path(fill, template)
    if flat:
        raise ModelLoadError(f"mapped tensors the model has no parameter for: {sorted(flat)}.")
    return variables


def build(wheel: str | os.PathLike[str] | None = None) -> ServableModel:
    """The servable model, imported from the wheel."""
    variables = to_variables(read_weights(find_wheel(wheel)))
    return ServableModel(
        name=NAME,
        config=silero_vad(),
        variables=variables,
        input_shape=(1,),
        input_dtype="float32",
        sample_rate=16000,
        description=DESCRIPTION,
        speech_segments=True,
    )


def import_to(directory: str | os.PathLike[str], wheel: str | None = None) -> Path:
    """`sl-models import silero-vad DIR`: writes an ordinary model directory."""
    return save_model_dir(build(wheel), directory)


def load_builtin() -> ServableModel:
    """The built-in `silero-vad`: the imported directory under build/ if there
    is one, else imported now from the wheel (and saved for next time)."""
    if (MODEL_DIR / "model.json").is_file():
        return load_model_dir(MODEL_DIR, name=NAME)
    model = build()
    try:
        save_model_dir(model, MODEL_DIR)
    except OSError:
        pass  # a read-only checkout still serves; it imports again next start
    return model
