"""`sl-stream`: stream a file to a server and save the outputs.

sl-stream --url grpc://127.0.0.1:50051 --model logmel speech.wav mel.npy
sl-stream --url ws://127.0.0.1:8080 --model demo-asr speech.wav logits.npy --realtime
sl-stream --url grpc://127.0.0.1:50051 --model silero-vad speech.wav probs.npy
sl-stream --server grpc://a:50051 --server grpc://b:50051 --model demo-asr long.wav out.npy

A stream the server hands off while draining (`moved`) resumes on its own:
on the same URL (a load balancer), or on the next `--server`/`--url` given;
the output file is the same as from one uninterrupted stream.

For a model with a speech-probability output (ModelInfo.speech_segments,
e.g. silero-vad) it also prints the file's speech segments, by Silero's
offline rule over the whole file (`clients/segments.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from clients.client import (
    AsyncWebSocketClient,
    Ended,
    Moved,
    Output,
    Started,
    StreamingError,
    aconnect,
    frames_for_ms,
)
from clients.segments import speech_segments


def read_input(path: str) -> tuple[np.ndarray, int | None]:
    """A .wav (16-bit PCM, returned as int16 [n, channels]) or a .npy array."""
    if path.endswith(".wav"):
        with wave.open(path, "rb") as w:
            if w.getsampwidth() != 2:
                raise ValueError(f"{path}: only 16-bit PCM wav is supported.")
            data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
            return data.reshape(-1, w.getnchannels()), w.getframerate()
    return np.load(path), None


async def run(args: argparse.Namespace) -> int:
    x, wav_rate = read_input(args.input)
    try:
        client = aconnect(args.url, api_key=args.api_key, ca_cert=args.ca_cert)
    except ValueError as e:
        print(f"sl-stream: {e}", file=sys.stderr)
        return 2
    total = len(x)
    sent = 0
    start = time.monotonic()

    async def chunks(chunk: int, rate: int) -> AsyncIterator[np.ndarray]:
        nonlocal sent
        for i in range(0, total, chunk):
            if args.realtime:
                # Pace to real time: chunk i is sent when its audio has "happened".
                due = start + (i + chunk) / rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            sent = min(total, i + chunk)
            yield x[i : i + chunk]

    frames: list[np.ndarray] = []
    try:
        info = None
        if hasattr(client, "get_model"):
            info = await client.get_model(args.model)  # type: ignore[union-attr]
        else:
            # WebSocket: the HTTP model listing has the sample rate (else the stream's
            # own error, e.g. NOT_FOUND or UNAUTHENTICATED, is what gets reported).
            with contextlib.suppress(OSError, ValueError, KeyError):
                models = await client.list_models()
                info = next((m for m in models if m["name"] == args.model), None)
        rate = (info or {}).get("sample_rate") or wav_rate or 100
        if wav_rate and info and info.get("sample_rate") and wav_rate != info["sample_rate"]:
            print(
                f"sl-stream: {args.input} is {wav_rate} Hz; the model expects {rate} Hz.",
                file=sys.stderr,
            )
            return 2
        chunk = frames_for_ms({"sample_rate": rate}, args.chunk_ms)
        # WebSocket frames carry no dtype: say that wav samples are int16 PCM.
        pcm = isinstance(client, AsyncWebSocketClient) and x.dtype == np.int16
        kwargs = {"dtype": "int16"} if pcm else {}
        stream = client.stream(args.model, chunks(chunk, rate), report_moves=True, **kwargs)
        async for event in stream:
            if isinstance(event, Moved):
                print(
                    f"\nsl-stream: the server handed the stream off; resumed on {event.url} "
                    f"from input frame {event.frames_received}",
                    file=sys.stderr,
                )
            elif isinstance(event, Output):
                frames.append(event.frames)
            elif isinstance(event, Ended):
                pass
            elif isinstance(event, Started):
                continue
            if args.progress:
                done = sum(f.shape[0] for f in frames)
                print(f"\r{sent}/{total} frames sent, {done} out", end="", file=sys.stderr)
    except StreamingError as e:
        print(f"\nsl-stream: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # connection refused, TLS failure: no traceback
        print(f"\nsl-stream: cannot reach {' or '.join(args.url)}: {e}", file=sys.stderr)
        return 1
    finally:
        await client.close()
    y = np.concatenate(frames) if frames else np.zeros((0,), np.float32)
    np.save(args.output, y)
    elapsed = time.monotonic() - start
    if args.progress:
        print("", file=sys.stderr)
    print(
        f"{args.input}: {total} frames in, {len(y)} frames out in {elapsed:.2f} s -> {args.output}"
    )
    if info and info.get("speech_segments") and len(y):
        print_segments(y, total, info)
    return 0


def print_segments(probs: np.ndarray, samples: int, info: dict) -> None:
    """One line per speech segment: input samples and seconds."""
    ratio = info["output_ratio"]
    window = ratio["denominator"] // ratio["numerator"]
    rate = info.get("sample_rate") or 16000
    segments = speech_segments(
        probs[:, 0].tolist(), sample_rate=rate, window=window, audio_length_samples=samples
    )
    print(f"speech segments: {len(segments)}")
    for seg in segments:
        start, end = seg["start"], seg["end"]
        print(f"  {start}-{end} samples  {start / rate:.3f}-{end / rate:.3f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sl-stream", description=__doc__.splitlines()[0])
    p.add_argument(
        "--url",
        "--server",
        dest="url",
        action="append",
        required=True,
        help="grpc://HOST:PORT or ws://HOST:PORT; repeat for replicas a moved stream "
        "resumes on, in turn",
    )
    p.add_argument("--model", required=True)
    p.add_argument("input", help=".wav (16-bit PCM) or .npy [frames, *channels]")
    p.add_argument("output", help=".npy for the output frames")
    p.add_argument("--realtime", action="store_true", help="pace chunks in real time")
    p.add_argument("--chunk-ms", type=float, default=100.0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--ca-cert", default=None, help="PEM certificate to trust (grpcs://, wss://)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if not Path(args.input).is_file():
        print(f"sl-stream: {args.input} does not exist.", file=sys.stderr)
        return 2
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
