"""Speech segments equal the official code on the same probabilities: the
streaming events (`server/segments.py`) against the wheel's `VADIterator`,
the whole-file segments (`clients/segments.py`) against its
`get_speech_timestamps_from_probs`, both run from the wheel's own source
(tests/server/vad_audio.py). Probabilities: the official ONNX model on
speech mixes, and random sequences that visit every branch."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from clients.segments import speech_segments
from server.errors import InvalidArgument
from server.segments import SegmentOptions, SpeechSegmenter
from tests.server.vad_audio import (
    official_events,
    official_segments,
    onnx_probs,
    speech_mix,
    wheel_or_skip,
)


@pytest.fixture(scope="module")
def wheel() -> Path:
    return wheel_or_skip()


def _random_probs(seed: int, n: int = 600) -> np.ndarray:
    """Runs of speech-like and silence-like windows with knife-edge values."""
    rng = np.random.default_rng(seed)
    out: list[float] = []
    while len(out) < n:
        level = rng.choice([0.02, 0.3, 0.4, 0.5, 0.6, 0.97])
        run = int(rng.integers(1, 25))
        out += list(np.clip(level + rng.normal(0, 0.08, run), 0, 1))
    probs = np.asarray(out[:n], np.float32)
    probs[rng.integers(0, n, 20)] = 0.5  # exactly at the threshold
    return probs


def _ours(probs: np.ndarray, options: SegmentOptions, seed: int) -> list[dict[str, int]]:
    # Pushed in random pieces, as outputs arrive from ticks.
    segmenter = SpeechSegmenter(options, window=512, sample_rate=16000)
    rng = np.random.default_rng(seed)
    events, i = [], 0
    while i < len(probs):
        n = int(rng.integers(1, 8))
        events += segmenter.push(probs[i : i + n].tolist())
        i += n
    return [{"start" if e.kind == "speech_started" else "end": e.sample} for e in events]


STREAM_OPTIONS = [
    {},
    {"threshold": 0.3},
    {"threshold": 0.6, "min_silence_duration_ms": 0, "speech_pad_ms": 0},
    {"min_silence_duration_ms": 500, "speech_pad_ms": 100},
]


@pytest.mark.parametrize("options", STREAM_OPTIONS)
def test_streaming_events_equal_vad_iterator(wheel: Path, options: dict) -> None:
    cases = [onnx_probs(wheel, speech_mix(s)) for s in (0, 1)]
    cases += [_random_probs(s) for s in range(4)]
    total = 0
    for k, probs in enumerate(cases):
        expected = official_events(wheel, probs, **options)
        assert _ours(probs, SegmentOptions(**options), seed=k) == expected
        total += len(expected)
    assert total > 20  # the cases do start and stop speech


def test_neg_threshold_option() -> None:
    # The official iterator fixes neg_threshold at threshold - 0.15; ours may
    # set it: a window between the two neither starts nor ends speech.
    probs = [0.9, 0.3, 0.3, 0.3, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1, 0.1]
    default = SpeechSegmenter(SegmentOptions(), 512, 16000).push(probs)
    lower = SpeechSegmenter(SegmentOptions(neg_threshold=0.2), 512, 16000).push(probs)
    assert [e.kind for e in default] == ["speech_started", "speech_stopped"]
    assert default[1].sample == 2 * 512 + 480 - 512  # silence from window 1
    assert lower[1].sample == 7 * 512 + 480 - 512  # silence from window 6
    with pytest.raises(InvalidArgument, match="neg_threshold"):
        SegmentOptions(threshold=0.5, neg_threshold=0.6)
    with pytest.raises(InvalidArgument, match="threshold"):
        SegmentOptions(threshold=0.0)


FILE_OPTIONS = [
    {},
    {"threshold": 0.35, "min_speech_duration_ms": 100, "speech_pad_ms": 60},
    {"max_speech_duration_s": 1.5},
    {"max_speech_duration_s": 1.2, "use_max_poss_sil_at_max_speech": False},
    {"min_silence_duration_ms": 300, "neg_threshold": 0.2},
]


@pytest.mark.parametrize("options", FILE_OPTIONS)
def test_whole_file_segments_equal_official(wheel: Path, options: dict) -> None:
    cases = [(onnx_probs(wheel, x), len(x)) for x in (speech_mix(0), speech_mix(1))]
    cases += [(p, len(p) * 512 - 100) for p in (_random_probs(s) for s in range(4))]
    total = 0
    for probs, samples in cases:
        expected = official_segments(wheel, probs, samples, **options)
        ours_options = {
            ("min_silence_at_max_speech_ms" if k == "min_silence_at_max_speech" else k): v
            for k, v in options.items()
        }
        got = speech_segments(probs.tolist(), audio_length_samples=samples, **ours_options)
        assert got == expected, options
        total += len(expected)
    assert total > 10


def test_whole_file_defaults_without_length(wheel: Path) -> None:
    for probs in itertools.islice((_random_probs(s, 200) for s in range(10, 20)), 5):
        fn = official_segments
        assert speech_segments(probs.tolist()) == fn(wheel, probs, len(probs) * 512)
