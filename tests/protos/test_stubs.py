"""The committed gRPC stubs are exactly what protos/generate.py produces."""

from pathlib import Path

from protos import generate


def test_stubs_match_proto() -> None:
    here = Path(generate.__file__).parent
    for name, text in generate.generate().items():
        assert (here / name).read_text() == text, f"{name} drifted: run python -m protos.generate"


def test_stub_imports_do_not_shadow_the_layer_library() -> None:
    text = (Path(generate.__file__).parent / "streaming_pb2_grpc.py").read_text()
    assert "from protos import streaming_pb2" in text
    assert "from sequence_layers" not in text
