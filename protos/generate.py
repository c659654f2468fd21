"""Generates the Python stubs of protos/ into the `protos` package.

    python -m protos.generate          # writes protos/streaming_pb2*.py
    python -m protos.generate --check  # exits 1 if the committed stubs drift

The proto's package path would make protoc emit `from sequence_layers.serving.v1
import ...`, which collides with the layer library; imports are rewritten to
`protos.` so the stubs live in this package.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "sequence_layers/serving/v1/streaming.proto"
OUTPUTS = ("streaming_pb2.py", "streaming_pb2.pyi", "streaming_pb2_grpc.py")


def generate() -> dict[str, str]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{HERE}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(HERE / PROTO),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        out = Path(tmp) / Path(PROTO).parent
        files = {}
        for name in OUTPUTS:
            text = (out / name).read_text()
            text = text.replace("from sequence_layers.serving.v1 import", "from protos import")
            files[name] = text
        return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    files = generate()
    drift = [n for n, t in files.items() if not (HERE / n).exists() or (HERE / n).read_text() != t]
    if args.check:
        if drift:
            print(f"stubs drift from {PROTO}: {drift}; run `python -m protos.generate`.")
            return 1
        return 0
    for name, text in files.items():
        (HERE / name).write_text(text)
    print(f"wrote {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
