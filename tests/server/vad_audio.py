"""Shared by the Silero VAD tests: the official wheel, real speech (spoken by
espeak-ng) mixed with silence, noise and tones, the official ONNX model run
frame by frame as its users run it, and the official segment code loaded
from the wheel's source without torch."""

from __future__ import annotations

import ast
import functools
import shutil
import subprocess
import tempfile
import types
import wave
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server import silero_vad
from server.errors import ModelLoadError

RATE = 16000
SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Streaming inference must give the same answer as the official runtime.",
    "Hello, can you hear me? One, two, three.",
)


def wheel_or_skip() -> Path:
    try:
        return silero_vad.find_wheel()
    except ModelLoadError as e:
        pytest.skip(f"silero-vad wheel not fetched ({e})")


@functools.cache
def _speak(text: str) -> np.ndarray:
    """espeak-ng's 22.05 kHz speech, resampled to 16 kHz float32 in [-1, 1)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed (`make test` installs it as root with apt)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.wav"
        subprocess.run([exe, "-w", str(path), text], check=True, capture_output=True, timeout=60)
        with wave.open(str(path)) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    x = pcm.astype(np.float64) / 32768.0
    t_out = np.arange(int(len(x) * RATE / rate)) / RATE
    return np.interp(t_out, np.arange(len(x)) / rate, x).astype(np.float32)


def speech_mix(seed: int) -> np.ndarray:
    """Speech, silence, white noise and tones in a random order and level:
    `[samples]` float32, a few seconds, not a multiple of 512."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = [np.zeros(int(rng.integers(2000, 9000)), np.float32)]
    pieces = ["speech0", "speech1", "noise", "tone", "silence", "speech2"]
    for kind in rng.permutation(pieces):
        if kind.startswith("speech"):
            part = _speak(SENTENCES[int(kind[-1])]) * float(rng.uniform(0.5, 1.5))
        elif kind == "noise":
            part = rng.normal(0, float(rng.uniform(0.005, 0.05)), int(rng.integers(4000, 12000)))
        elif kind == "tone":
            t = np.arange(int(rng.integers(4000, 12000))) / RATE
            part = 0.2 * np.sin(2 * np.pi * float(rng.uniform(150, 2000)) * t)
        else:
            part = np.zeros(int(rng.integers(3000, 16000)))
        parts.append(np.asarray(part, np.float32))
    x = np.concatenate(parts)
    x = x + rng.normal(0, 1e-3, x.shape)  # a little room noise everywhere
    return np.clip(x, -1, 1).astype(np.float32)[: len(x) - int(rng.integers(1, 511))]


@functools.cache
def _session(wheel: Path) -> Any:
    import onnxruntime as ort

    with zipfile.ZipFile(wheel) as z:
        model = z.read("silero_vad/data/silero_vad.onnx")  # the stock streaming model
    opts = ort.SessionOptions()
    opts.inter_op_num_threads = opts.intra_op_num_threads = 1
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_probs(wheel: Path, x: np.ndarray) -> np.ndarray:
    """The official loop (`OnnxWrapper.__call__` per 512-sample window, the
    last one zero-padded as `get_speech_timestamps` pads it): `[frames]`."""
    session = _session(wheel)
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, 64), np.float32)
    x = np.pad(x, (0, -len(x) % 512))
    out = []
    for i in range(0, len(x), 512):
        window = np.concatenate([context, x[None, i : i + 512]], axis=1)
        prob, state = session.run(
            None, {"input": window, "state": state, "sr": np.array(RATE, np.int64)}
        )
        context = window[:, -64:]
        out.append(float(prob[0, 0]))
    return np.asarray(out, np.float32)


@functools.cache
def official_vad_code(wheel: Path) -> types.SimpleNamespace:
    """`VADIterator` and `get_speech_timestamps_from_probs`, taken verbatim
    from the wheel's `utils_vad.py` with `ast` and run without torch (the
    module imports torch at the top): a stub `torch` gives them the two
    things they touch (`no_grad`, `is_tensor`)."""
    with zipfile.ZipFile(wheel) as z:
        source = z.read("silero_vad/utils_vad.py").decode()
    tree = ast.parse(source)
    wanted = {"VADIterator", "get_speech_timestamps_from_probs"}
    nodes = [n for n in tree.body if getattr(n, "name", None) in wanted]
    assert {n.name for n in nodes} == wanted  # type: ignore[attr-defined]
    module = ast.Module(body=nodes, type_ignores=[])
    torch_stub = types.SimpleNamespace(
        no_grad=lambda: lambda fn: fn, is_tensor=lambda x: True, Tensor=None
    )
    namespace: dict[str, Any] = {"torch": torch_stub, "List": list, "Callable": Any}
    exec(compile(module, "silero_vad/utils_vad.py", "exec"), namespace)
    return types.SimpleNamespace(**{name: namespace[name] for name in wanted})


class _Window:
    """What `VADIterator.__call__` reads of its audio chunk: `dim()` and `len`."""

    def __init__(self, n: int) -> None:
        self.n = n

    def dim(self) -> int:
        return 1

    def __len__(self) -> int:
        return self.n


class _ProbModel:
    """Stands in for the model call: returns the given probabilities in turn."""

    def __init__(self, probs: np.ndarray) -> None:
        self.probs = [float(p) for p in probs]
        self.i = 0

    def reset_states(self) -> None:
        self.i = 0

    def __call__(self, x: Any, sr: int) -> Any:
        p = self.probs[self.i]
        self.i += 1
        return types.SimpleNamespace(item=lambda: p)


def official_events(wheel: Path, probs: np.ndarray, **kwargs: Any) -> list[dict[str, int]]:
    """The official `VADIterator` over `probs` (one per 512-sample window)."""
    it = official_vad_code(wheel).VADIterator(_ProbModel(probs), **kwargs)
    events = []
    for _ in probs:
        event = it(_Window(512))
        if event:
            events.append(event)
    return events


def official_segments(wheel: Path, probs: np.ndarray, samples: int, **kw: Any) -> list[dict]:
    """The official `get_speech_timestamps_from_probs`."""
    fn = official_vad_code(wheel).get_speech_timestamps_from_probs
    return fn([float(p) for p in probs], audio_length_samples=samples, **kw)
