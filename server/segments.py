"""Speech segments from a speech-probability output, as a stream goes.

The rule is Silero's streaming one (`VADIterator` in the silero-vad
package): a window at or above `threshold` starts speech; once speaking, a
window below `neg_threshold` marks a possible end, which becomes the end
when no window reaches `threshold` again within `min_silence_duration_ms`.
Starts are moved `speech_pad_ms` earlier and ends `speech_pad_ms` later.
Offsets are input samples from the start of the stream. A stream that ends
while speaking gets no `speech_stopped` (as in the official iterator).

Tested against the official code itself (tests/server/test_segments.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from server.errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class SegmentOptions:
    """Per-stream settings; the defaults are the official ones."""

    # A window with probability >= threshold is speech.
    threshold: float = 0.5
    # While speaking, a window below this may end the speech (None: threshold - 0.15).
    neg_threshold: float | None = None
    # Silence to wait for before speech ends.
    min_silence_duration_ms: int = 100
    # Samples added before each start and after each end.
    speech_pad_ms: int = 30

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise InvalidArgument(f"speech threshold must be in (0, 1], got {self.threshold}.")
        if self.resolved_neg_threshold > self.threshold:
            raise InvalidArgument(
                f"neg_threshold must not exceed threshold={self.threshold}, got "
                f"{self.neg_threshold}."
            )
        if self.min_silence_duration_ms < 0 or self.speech_pad_ms < 0:
            raise InvalidArgument(
                "min_silence_duration_ms and speech_pad_ms must be non-negative, got "
                f"{self.min_silence_duration_ms} and {self.speech_pad_ms}."
            )

    @property
    def resolved_neg_threshold(self) -> float:
        if self.neg_threshold is None:
            return self.threshold - 0.15
        return self.neg_threshold


@dataclasses.dataclass(frozen=True)
class SpeechEvent:
    """`speech_started` or `speech_stopped` at input sample `sample`."""

    kind: str
    sample: int


class SpeechSegmenter:
    """Turns probabilities (one per `window` input samples) into events."""

    def __init__(self, options: SegmentOptions, window: int, sample_rate: int) -> None:
        self.options = options
        self.window = window
        self._neg = options.resolved_neg_threshold
        self._pad = sample_rate * options.speech_pad_ms / 1000
        self._min_silence = sample_rate * options.min_silence_duration_ms / 1000
        self._speaking = False
        # End of the first window of the silence that may end the speech (0: none).
        self._silence_from = 0
        # Input samples covered by the windows seen so far.
        self._samples = 0

    def state(self) -> dict[str, Any]:
        """Where it is, JSON-able: a moved stream carries it in its token."""
        return {
            "speaking": self._speaking,
            "silence_from": self._silence_from,
            "samples": self._samples,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continues from `state()` of the same stream on another server."""
        try:
            speaking, silence, samples = state["speaking"], state["silence_from"], state["samples"]
        except (KeyError, TypeError):
            raise InvalidArgument("the resume token has an incomplete segment state.") from None
        if not isinstance(speaking, bool) or type(silence) is not int or type(samples) is not int:
            raise InvalidArgument("the resume token's speech segment state is malformed.")
        self._speaking, self._silence_from, self._samples = speaking, silence, samples

    def push(self, probs: Iterable[float]) -> list[SpeechEvent]:
        events = []
        for p in probs:
            self._samples += self.window
            if p >= self.options.threshold:
                self._silence_from = 0
                if not self._speaking:
                    self._speaking = True
                    start = max(0.0, self._samples - self._pad - self.window)
                    events.append(SpeechEvent("speech_started", int(start)))
                continue
            if self._speaking and p < self._neg:
                if not self._silence_from:
                    self._silence_from = self._samples
                if self._samples - self._silence_from >= self._min_silence:
                    end = self._silence_from + self._pad - self.window
                    events.append(SpeechEvent("speech_stopped", int(end)))
                    self._silence_from = 0
                    self._speaking = False
        return events
