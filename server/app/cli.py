"""`sl-models` and `sl-offline`: model directories and the offline oracle.

sl-models list
sl-models export demo-asr ./models/demo-asr
sl-models export --programs demo-asr ./models/demo-asr   # + jax.export step programs
sl-models import silero-vad ./models/silero-vad   # official weights, from the PyPI wheel
sl-offline demo-asr input.npy output.npy     # or a model directory
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from server import silero_vad
from server.defaults import BUILTIN_MODELS
from server.errors import ModelLoadError
from server.model import ServableModel, load_model_dir, save_model_dir


def resolve_model(spec: str) -> ServableModel:
    """A built-in model name or a model directory."""
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec]()
    if Path(spec).is_dir():
        return load_model_dir(spec)
    known = ", ".join(sorted(BUILTIN_MODELS))
    raise ModelLoadError(f"{spec!r} is neither a built-in model ({known}) nor a model directory.")


def models_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sl-models", description="Built-in models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the built-in models")
    export = sub.add_parser(
        "export", help="write a built-in model (or re-write a model directory) as a model directory"
    )
    export.add_argument("name", help=f"a built-in ({', '.join(sorted(BUILTIN_MODELS))}) or DIR")
    export.add_argument("directory")
    export.add_argument(
        "--programs",
        action="store_true",
        help="also write the streaming step as jax.export programs: the directory then "
        "serves without the model's layer code, and starts without tracing it",
    )
    export.add_argument(
        "--platforms",
        help="platforms to export the programs for, e.g. cpu,cuda (default: this machine's)",
    )
    imp = sub.add_parser(
        "import", help="import a published model's official weights as a model directory"
    )
    imp.add_argument("name", choices=["silero-vad"])
    imp.add_argument("directory")
    imp.add_argument(
        "--wheel",
        help=f"the silero-vad wheel (default: build/{silero_vad.WHEEL}, `make` fetches it)",
    )
    args = parser.parse_args(argv)
    if args.command == "import":
        try:
            path = silero_vad.import_to(args.directory, args.wheel)
        except ModelLoadError as e:
            print(f"sl-models import: {e}", file=sys.stderr)
            return 2
        print(f"imported {args.name} into {path}")
        return 0
    if args.command == "list":
        for name in sorted(BUILTIN_MODELS):
            try:
                info = BUILTIN_MODELS[name]().info()
            except ModelLoadError as e:
                print(f"{name}\tnot available: {e}")
                continue
            print(
                f"{name}\tin {list(info.input_shape)} out {list(info.output_shape)} "
                f"ratio {info.output_ratio} block {info.block_size} "
                f"latency {info.input_latency}/{info.output_latency}\t{info.description}"
            )
        return 0
    platforms = tuple(args.platforms.split(",")) if args.platforms else None
    try:
        model = resolve_model(args.name)
        path = save_model_dir(model, args.directory, programs=args.programs, platforms=platforms)
    except ModelLoadError as e:
        print(f"sl-models: {e}", file=sys.stderr)
        return 2
    what = " with exported programs" if args.programs else ""
    print(f"wrote {args.name} to {path}{what}")
    return 0


def offline_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sl-offline",
        description="Whole-utterance layer() inference; writes the valid output frames.",
    )
    parser.add_argument("model", help="built-in model name or model directory")
    parser.add_argument("input", help=".npy of shape [frames, *input_shape]")
    parser.add_argument("output", help=".npy to write, [frames, *output_shape] float32")
    args = parser.parse_args(argv)
    try:
        model = resolve_model(args.model)
        x = np.load(args.input)
    except (ModelLoadError, OSError, ValueError) as e:
        print(f"sl-offline: {e}", file=sys.stderr)
        return 2
    if x.ndim == len(model.input_shape) and model.input_shape == (1,):
        x = x.reshape(-1, 1)
    if tuple(x.shape[1:]) != model.input_shape:
        print(
            f"sl-offline: input shape {list(x.shape)} does not match model {model.name!r}: "
            f"expected [frames, {', '.join(map(str, model.input_shape))}].",
            file=sys.stderr,
        )
        return 2
    y = model.offline(x)
    np.save(args.output, y)
    print(f"{args.input}: {x.shape[0]} frames in, {y.shape[0]} frames out -> {args.output}")
    return 0
