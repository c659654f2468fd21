"""Resume-token figures per built-in model (stream migration, issue 18):
token bytes for one stream, and the time to sign and verify it.

    python -m loadtests.token_sizes [--chunk-blocks 4] [--models demo-asr,logmel]

The state is the model's initial per-stream state (the shapes a live stream
carries; its values do not change the size), plus the worst case of buffered
input: one chunk less a frame. Prints JSON, one object per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from server import resume
from server.defaults import BUILTIN_MODELS
from server.errors import ModelLoadError


def measure(name: str, chunk_blocks: int, repeats: int = 20) -> dict[str, object]:
    model = BUILTIN_MODELS[name]()
    start = time.perf_counter()
    fingerprint = resume.model_fingerprint(model)
    fingerprint_s = time.perf_counter() - start
    state = model.program.initial_state(model.variables, 1)
    # One stream's row: drop the batch axis of every leaf.
    leaves = tuple(np.asarray(leaf)[0] for leaf in jax.tree.leaves(state))
    chunk = model.block_size * chunk_blocks
    buffered = np.zeros((chunk - 1, *model.input_shape), np.float32)
    snapshot = resume.StreamSnapshot(
        stream_id="s",
        frames_received=10 * chunk + chunk - 1,
        frames_consumed=10 * chunk,
        frames_emitted=0,
        ticks=10,
        outputs_to_drop=0,
        buffered_input=buffered,
        state=leaves,
    )
    keys = resume.ResumeKeys((b"k" * 64,))
    start = time.perf_counter()
    for _ in range(repeats):
        token = resume.sign_token(snapshot, keys, model_name=name, fingerprint=fingerprint)
    sign_s = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        resume.verify_token(token, keys, model_name=name, fingerprint=fingerprint)
    verify_s = (time.perf_counter() - start) / repeats
    return {
        "model": name,
        "token_bytes": len(token),
        "state_bytes": sum(a.nbytes for a in leaves),
        "state_leaves": len(leaves),
        "buffered_input_bytes": buffered.nbytes,
        "sign_ms": round(sign_s * 1e3, 3),
        "verify_ms": round(verify_s * 1e3, 3),
        "fingerprint_s": round(fingerprint_s, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-blocks", type=int, default=4)
    parser.add_argument("--models", default=",".join(BUILTIN_MODELS))
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        try:
            print(json.dumps(measure(name, args.chunk_blocks)), flush=True)
        except ModelLoadError as e:  # silero-vad without its wheel
            print(json.dumps({"model": name, "skipped": str(e)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
