"""A model's streaming step as code or as exported programs.

`sl-serve` needs four things from a model: its streaming signature (block
size, output ratio, latencies, output spec), its initial state for a batch,
its `step`, and (for `sl-offline`) whole-input inference. `LayerProgram`
gets them from the model's Python layer code. `ExportedProgram` gets them
from `jax.export` artifacts (serialized StableHLO) written into the model
directory by `sl-models export --programs`, so a server can serve a model
whose layer code it cannot import (a custom layer, a newer library), and
skips tracing Python at start-up.

Artifacts, in `DIR/programs/`:
- `init.jax`: `(variable leaves, x [b, frames, *C]) -> state leaves`
  (x only carries the batch size; b is symbolic);
- `step.jax`: `(variable leaves, state leaves, x [b, frames, *C],
  mask [b, frames]) -> (state leaves, y [b, frames * ratio, *C_out] float32,
  y_mask)`, the input a MaskedSequence (invalid frames zero).

`frames` is one block: the server steps a chunk of several blocks by calling
the step once per block inside its compiled tick. The signature and the
platforms live in `model.json` under `"programs"`.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import export

import sequence_layers as sl
from server import compile_cache
from server.errors import ModelLoadError

log = logging.getLogger("sl-serve")

PROGRAMS_DIR = "programs"
PROGRAMS_FORMAT = "jax.export"
PROGRAMS_VERSION = 1


@dataclasses.dataclass(frozen=True)
class StepSignature:
    """What a server must know about a model's streaming step."""

    block_size: int
    output_ratio: Fraction
    input_latency: int
    output_latency: int
    output_shape: tuple[int, ...]
    output_dtype: str

    @classmethod
    def of_layer(cls, layer: sl.SequenceLayer, input_spec: sl.ChannelSpec) -> StepSignature:
        out = layer.get_output_spec(input_spec)
        return cls(
            block_size=int(layer.block_size),
            output_ratio=Fraction(layer.output_ratio),
            input_latency=int(layer.input_latency),
            output_latency=int(layer.output_latency),
            output_shape=tuple(int(d) for d in out.shape),
            output_dtype=str(jnp.dtype(out.dtype)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "output_ratio": [self.output_ratio.numerator, self.output_ratio.denominator],
            "input_latency": self.input_latency,
            "output_latency": self.output_latency,
            "output": {"shape": list(self.output_shape), "dtype": self.output_dtype},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StepSignature:
        num, den = d["output_ratio"]
        return cls(
            block_size=int(d["block_size"]),
            output_ratio=Fraction(int(num), int(den)),
            input_latency=int(d["input_latency"]),
            output_latency=int(d["output_latency"]),
            output_shape=tuple(int(s) for s in d["output"]["shape"]),
            output_dtype=str(d["output"]["dtype"]),
        )


class LayerProgram:
    """The step from the model's layer code (traced when the server compiles)."""

    def __init__(self, layer: sl.SequenceLayer, input_spec: sl.ChannelSpec) -> None:
        self.layer = layer
        self.input_spec = input_spec
        self.signature = StepSignature.of_layer(layer, input_spec)

    def initial_state(self, variables: Any, batch_size: Any) -> Any:
        layer = self.layer
        return layer.apply(
            variables, batch_size, self.input_spec, training=False, method=layer.get_initial_state
        )

    def step(
        self, variables: Any, state: Any, x: jax.Array, mask: jax.Array
    ) -> tuple[Any, jax.Array, jax.Array]:
        # Callers zero every invalid frame, so the input is a MaskedSequence:
        # layers skip re-masking it (measured 5% of a demo-asr tick).
        layer = self.layer
        y, new = layer.apply(
            variables, sl.MaskedSequence(x, mask), state, training=False, method=layer.step
        )
        return new, y.values.astype(jnp.float32), y.mask


class ExportedProgram:
    """The step from `jax.export` artifacts; no layer code needed."""

    def __init__(
        self,
        init: export.Exported,
        step: export.Exported,
        signature: StepSignature,
        input_spec: sl.ChannelSpec,
    ) -> None:
        self.init_artifact, self.step_artifact = init, step
        self.signature = signature
        self.input_spec = input_spec
        # Frames a call of each artifact takes (the x argument is second to
        # last of the step's, last of init's): a block for `sl-models export`
        # artifacts, a whole chunk for the server's own in-memory export.
        self.frames = int(step.in_avals[-2].shape[1])
        self._init_frames = int(init.in_avals[-1].shape[1])
        # The step's first argument (in_tree is `(args, kwargs)`): the
        # variable leaves it was exported with, to check a checkpoint against.
        args_tree = step.in_tree.children()[0]
        n_variables = args_tree.children()[0].num_leaves
        self.variable_specs: list[Any] = list(step.in_avals[:n_variables])

    def initial_state(self, variables: Any, batch_size: int) -> list[jax.Array]:
        shape = (batch_size, self._init_frames, *self.input_spec.shape)
        x = jnp.zeros(shape, self.input_spec.dtype)
        return list(self.init_artifact.call(jax.tree.leaves(variables), x))

    def step(
        self, variables: Any, state: list[jax.Array], x: jax.Array, mask: jax.Array
    ) -> tuple[list[jax.Array], jax.Array, jax.Array]:
        leaves = jax.tree.leaves(variables)
        if x.shape[1] % self.frames:
            raise ValueError(
                f"exported step takes {self.frames} frames a call; a chunk of {x.shape[1]} "
                "frames is not a multiple of it."
            )
        ys, masks = [], []
        # One call per `frames`: the contract makes a chunk of n blocks equal
        # to n steps of one block. Artifacts of one block still run n calls
        # (compiled into one program, but n passes of small ops: demo-asr at
        # 4 blocks took 1.85x the time of one 4-block step).
        for start in range(0, x.shape[1], self.frames):
            piece = slice(start, start + self.frames)
            state, y, y_mask = self.step_artifact.call(leaves, state, x[:, piece], mask[:, piece])
            state = list(state)
            ys.append(y)
            masks.append(y_mask)
        if len(ys) == 1:
            return state, ys[0], masks[0]
        return state, jnp.concatenate(ys, axis=1), jnp.concatenate(masks, axis=1)


def current_platform() -> str:
    """The platform name `jax.export` uses for this process's default backend."""
    device = jax.devices()[0]
    if device.platform == "gpu":
        return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"
    return str(device.platform)


def export_in_memory(
    layer: sl.SequenceLayer,
    variables: Any,
    input_spec: sl.ChannelSpec,
    platforms: tuple[str, ...] | None = None,
    frames: int | None = None,
) -> ExportedProgram:
    """The layer's init and step exported with a symbolic batch size: traced
    once, then every batch bucket only traces a call of the artifact.
    `frames` (a multiple of the block size; default one block) is what one
    call steps: the server exports its whole chunk, so a tick is one step
    of the chunk as when the layer code is traced per bucket.

    With the compilation cache on, the artifacts are also kept there (see
    `server.compile_cache`), so a later start with the same model, library
    and jax reads them back instead of tracing the layer code (demo-asr:
    1.2 CPU s)."""
    signature = StepSignature.of_layer(layer, input_spec)
    frames = signature.block_size if frames is None else frames
    if frames <= 0 or frames % signature.block_size:
        raise ValueError(
            f"frames={frames} is not a multiple of the block size {signature.block_size}."
        )
    var_specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in jax.tree.leaves(variables)]
    platforms_key = tuple(platforms) if platforms else (current_platform(),)
    key = compile_cache.trace_key(
        getattr(layer, "config", None),
        "export",
        PROGRAMS_VERSION,
        str(jax.tree.structure(variables)),
        [(a.shape, str(a.dtype)) for a in var_specs],
        (input_spec.shape, str(jnp.dtype(input_spec.dtype))),
        platforms_key,
        frames,
    )
    payload = compile_cache.read_traced("export", key)
    if payload is not None:
        cached = _unpack(payload, signature, input_spec, var_specs)
        if cached is not None:
            return cached
    program = _export(layer, variables, input_spec, signature, var_specs, platforms, frames)
    if key is not None:
        compile_cache.write_traced("export", key, _pack(program))
    return program


def _export(
    layer: sl.SequenceLayer,
    variables: Any,
    input_spec: sl.ChannelSpec,
    signature: StepSignature,
    var_specs: list[jax.ShapeDtypeStruct],
    platforms: tuple[str, ...] | None,
    frames: int,
) -> ExportedProgram:
    var_def = jax.tree.structure(variables)
    (b,) = export.symbolic_shape("b")
    x_spec = jax.ShapeDtypeStruct((b, frames, *input_spec.shape), input_spec.dtype)
    mask_spec = jax.ShapeDtypeStruct((b, frames), jnp.bool_)
    program = LayerProgram(layer, input_spec)

    def init_tree(var_leaves: list[jax.Array], x: jax.Array) -> Any:
        return program.initial_state(jax.tree.unflatten(var_def, var_leaves), x.shape[0])

    state_tree = jax.eval_shape(init_tree, var_specs, x_spec)
    state_def = jax.tree.structure(state_tree)

    def init(var_leaves: list[jax.Array], x: jax.Array) -> list[jax.Array]:
        return jax.tree.leaves(init_tree(var_leaves, x))

    def step(
        var_leaves: list[jax.Array], state_leaves: list[jax.Array], x: jax.Array, mask: jax.Array
    ) -> tuple[list[jax.Array], jax.Array, jax.Array]:
        variables = jax.tree.unflatten(var_def, var_leaves)
        state = jax.tree.unflatten(state_def, state_leaves)
        new, y, y_mask = program.step(variables, state, x, mask)
        return jax.tree.leaves(new), y, y_mask

    try:
        exported_init = export.export(jax.jit(init), platforms=platforms)(var_specs, x_spec)
        exported_step = export.export(jax.jit(step), platforms=platforms)(
            var_specs, jax.tree.leaves(state_tree), x_spec, mask_spec
        )
    except Exception as e:  # tracing user layer code raises anything
        raise ModelLoadError(
            f"cannot export the model's step with a symbolic batch size: {e}. Serve the model "
            "directory without --programs instead."
        ) from e
    return ExportedProgram(exported_init, exported_step, signature, input_spec)


def _pack(program: ExportedProgram) -> bytes:
    init = program.init_artifact.serialize()
    return struct.pack("<Q", len(init)) + init + program.step_artifact.serialize()


def _unpack(
    payload: bytes,
    signature: StepSignature,
    input_spec: sl.ChannelSpec,
    var_specs: list[jax.ShapeDtypeStruct],
) -> ExportedProgram | None:
    """The cached programs, or None (logged) when they do not deserialize or
    do not take these variables."""
    try:
        (n,) = struct.unpack_from("<Q", payload)
        init = export.deserialize(bytearray(payload[8 : 8 + n]))
        step = export.deserialize(bytearray(payload[8 + n :]))
        program = ExportedProgram(init, step, signature, input_spec)
    except Exception as e:  # a damaged flatbuffer raises anything
        log.warning("traced cache: unreadable exported step (%s); tracing instead", e)
        return None
    got = [(tuple(a.shape), a.dtype) for a in program.variable_specs]
    if got != [(tuple(a.shape), a.dtype) for a in var_specs]:
        log.warning("traced cache: exported step takes other variables; tracing instead")
        return None
    return program


def export_programs(
    layer: sl.SequenceLayer,
    variables: Any,
    input_spec: sl.ChannelSpec,
    directory: Path,
    platforms: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Writes `directory/programs/{init,step}.jax`; returns the `model.json`
    entry that describes them. Batch is symbolic, so one artifact serves
    every bucket."""
    program = export_in_memory(layer, variables, input_spec, platforms)
    out = directory / PROGRAMS_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "init.jax").write_bytes(program.init_artifact.serialize())
    (out / "step.jax").write_bytes(program.step_artifact.serialize())
    return {
        "format": PROGRAMS_FORMAT,
        "version": PROGRAMS_VERSION,
        "platforms": list(program.step_artifact.platforms),
        "jax_version": jax.__version__,
        "signature": program.signature.to_json(),
    }


def load_programs(
    directory: Path, entry: dict[str, Any], input_spec: sl.ChannelSpec
) -> ExportedProgram:
    """Reads the artifacts `entry` (model.json's "programs") describes.
    Raises ModelLoadError naming the file and the reason, and
    `PlatformMismatch` when they were exported for another platform."""
    where = directory / PROGRAMS_DIR
    if entry.get("format") != PROGRAMS_FORMAT or entry.get("version") != PROGRAMS_VERSION:
        raise ModelLoadError(
            f"{directory / 'model.json'}: programs format {entry.get('format')!r} version "
            f"{entry.get('version')!r} is not {PROGRAMS_FORMAT!r} {PROGRAMS_VERSION}; re-export."
        )
    platform = current_platform()
    platforms = [str(p) for p in entry.get("platforms", [])]
    if platform not in platforms:
        raise PlatformMismatch(
            f"{where}: exported for {', '.join(platforms)}, this server runs on {platform}; "
            f"re-export with `sl-models export --programs --platforms {platform},...`."
        )
    try:
        init = export.deserialize(bytearray((where / "init.jax").read_bytes()))
        step = export.deserialize(bytearray((where / "step.jax").read_bytes()))
        signature = StepSignature.from_json(entry["signature"])
    except FileNotFoundError as e:
        raise ModelLoadError(f"{e.filename} is missing: re-export the model's programs.") from e
    except Exception as e:  # a corrupt flatbuffer raises anything
        raise ModelLoadError(f"{where}: unreadable exported programs ({e}); re-export.") from e
    return ExportedProgram(init, step, signature, input_spec)


class PlatformMismatch(ModelLoadError):
    """Exported programs that do not run on this server's platform."""
