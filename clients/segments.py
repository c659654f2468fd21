"""Speech segments of a whole recording from its per-window speech
probabilities: Silero's offline rule (`get_speech_timestamps_from_probs` in
the silero-vad package), which can look at the whole file. `sl-stream`
prints these for a file; live streams get events from the server instead
(`server/segments.py`). Defaults are the official ones. Returns
`[{"start": sample, "end": sample}, ...]`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def speech_segments(
    probs: Sequence[float],
    *,
    sample_rate: int = 16000,
    window: int = 512,
    audio_length_samples: int | None = None,
    threshold: float = 0.5,
    neg_threshold: float | None = None,
    min_speech_duration_ms: int = 250,
    max_speech_duration_s: float = math.inf,
    min_silence_duration_ms: int = 100,
    speech_pad_ms: int = 30,
    min_silence_at_max_speech_ms: int = 98,
    use_max_poss_sil_at_max_speech: bool = True,
) -> list[dict[str, int]]:
    """Segments in input samples (see the module docstring)."""
    total = len(probs) * window if audio_length_samples is None else audio_length_samples
    neg = max(threshold - 0.15, 0.01) if neg_threshold is None else neg_threshold
    min_speech = sample_rate * min_speech_duration_ms / 1000
    pad = sample_rate * speech_pad_ms / 1000
    max_speech = sample_rate * max_speech_duration_s - window - 2 * pad
    min_silence = sample_rate * min_silence_duration_ms / 1000
    min_silence_at_max = sample_rate * min_silence_at_max_speech_ms / 1000

    segments: list[dict[str, float]] = []
    current: dict[str, float] = {}
    speaking = False
    silence_from = 0  # sample where the current silence began (0: none)
    prev_end = next_start = 0  # fallback cut for over-long speech
    candidate_ends: list[tuple[int, int]] = []  # (silence start, its length)

    def close(end: float) -> None:
        nonlocal current
        current["end"] = end
        segments.append(current)
        current = {}

    for i, p in enumerate(probs):
        sample = window * i
        if p >= threshold and silence_from:
            if sample - silence_from > min_silence_at_max:
                candidate_ends.append((silence_from, sample - silence_from))
            silence_from = 0
            if next_start < prev_end:
                next_start = sample
        if p >= threshold and not speaking:
            speaking = True
            current["start"] = sample
            continue
        if speaking and sample - current["start"] > max_speech:
            if use_max_poss_sil_at_max_speech and candidate_ends:
                # Cut at the longest silence inside this segment.
                prev_end, length = max(candidate_ends, key=lambda c: c[1])
                close(prev_end)
                next_start = prev_end + length
                if next_start < prev_end + sample:
                    current["start"] = next_start
                else:
                    speaking = False
                prev_end = next_start = silence_from = 0
                candidate_ends = []
            elif prev_end:
                close(prev_end)
                if next_start < prev_end:
                    speaking = False
                else:
                    current["start"] = next_start
                prev_end = next_start = silence_from = 0
                candidate_ends = []
            else:
                close(sample)
                prev_end = next_start = silence_from = 0
                speaking = False
                candidate_ends = []
                continue
        if p < neg and speaking:
            if not silence_from:
                silence_from = sample
            silent_for = sample - silence_from
            if not use_max_poss_sil_at_max_speech and silent_for > min_silence_at_max:
                prev_end = silence_from
            if silent_for < min_silence:
                continue
            if silence_from - current["start"] > min_speech:
                close(silence_from)
            current = {}
            prev_end = next_start = silence_from = 0
            speaking = False
            candidate_ends = []
            continue

    if current and total - current["start"] > min_speech:
        close(total)

    # Pad each segment, splitting short gaps between neighbours evenly.
    for i, seg in enumerate(segments):
        if i == 0:
            seg["start"] = int(max(0, seg["start"] - pad))
        if i != len(segments) - 1:
            gap = segments[i + 1]["start"] - seg["end"]
            if gap < 2 * pad:
                seg["end"] += int(gap // 2)
                segments[i + 1]["start"] = int(max(0, segments[i + 1]["start"] - gap // 2))
            else:
                seg["end"] = int(min(total, seg["end"] + pad))
                segments[i + 1]["start"] = int(max(0, segments[i + 1]["start"] - pad))
        else:
            seg["end"] = int(min(total, seg["end"] + pad))
    return [{"start": int(s["start"]), "end": int(s["end"])} for s in segments]
