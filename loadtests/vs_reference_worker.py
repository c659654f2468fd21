"""One side of `bench_vs_reference.py`: builds and times the benchmark cases
in whichever `sequence_layers` this interpreter imports.

The project and Google's reference share the import name `sequence_layers`
(the reference's layers live in `sequence_layers.jax`), so the driver runs
this file once in each virtualenv. Run as a script (not `-m`), so that in the
reference venv nothing from this repository shadows the installed package.

Protocol: one JSON request per stdin line, one JSON reply per stdout line.
Arrays (parameters, inputs, outputs) travel as `.npz` files in a scratch
directory named by the driver.

    {"op": "build", "case": ..., "batch": b, "units": n, "blocks": [1, 8],
     "params_in": path | null, "dump": dir}
        -> {"ok": true, "params_out": path, "copied": n, "total": m,
            "block_size": k, "frames": n * k}
    {"op": "time", "what": "layer" | "step1" | ..., "min_seconds": s} -> {"seconds": t}
    {"op": "info"} -> {"side": "ours" | "reference", "jax": version, "cases": [...]}

Errors come back as {"ok": false, "error": ..., "trace": ...}.
"""

from __future__ import annotations

import json
import re
import sys
import time
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The reference uses typing.override / typing.Self (Python 3.12); on 3.11
# they come from typing_extensions.
if sys.version_info < (3, 12):
    import typing_extensions

    for _name in ("override", "Self"):
        if not hasattr(typing, _name):
            setattr(typing, _name, getattr(typing_extensions, _name))

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

try:  # the reference: `sequence_layers.jax`
    import sequence_layers.jax as sl  # type: ignore[import-not-found]

    SIDE = "reference"
except ImportError:
    import sequence_layers as sl

    SIDE = "ours"

Config = Any
# name -> () -> (config, input channels); 0 channels: inputs `[b, t]`.
CaseFn = Callable[[], tuple[Config, int]]


def _conv_stack(specs: list[tuple[int, int, int]], filters: int = 128) -> Config:
    return sl.Serial.Config(
        tuple(
            sl.Conv1D.Config(
                filters=filters,
                kernel_size=k,
                strides=s,
                dilation_rate=d,
                padding="causal",
                activation=jax.nn.relu,
            )
            for k, s, d in specs
        )
    )


def _attention_residual(attention: Config, d_model: int) -> Config:
    """Pre-norm self-attention; it has no output projection, so the heads
    are flattened and projected back to d_model."""
    return sl.Residual.Config(
        (
            sl.LayerNormalization.Config(),
            attention,
            sl.Flatten.Config(),
            sl.Dense.Config(d_model),
        )
    )


def _block(attention: Config, d_model: int, ffn: int) -> Config:
    """Pre-norm Transformer block; self-attention has no output projection,
    so flatten heads and project back to d_model."""
    return sl.Serial.Config(
        (
            _attention_residual(attention, d_model),
            sl.Residual.Config(
                (
                    sl.LayerNormalization.Config(),
                    sl.Dense.Config(ffn, activation=jax.nn.gelu),
                    sl.Dense.Config(d_model),
                )
            ),
        )
    )


def _half_ffn(d_model: int, ffn: int) -> Config:
    return sl.Residual.Config(
        (
            sl.LayerNormalization.Config(),
            sl.Dense.Config(ffn, activation=jax.nn.swish),
            sl.Dense.Config(d_model),
            sl.Scale.Config(0.5),
        )
    )


def _conformer(d_model: int, heads: int, ffn: int) -> Config:
    attention = sl.LocalDotProductSelfAttention.Config(
        num_heads=heads, units_per_head=d_model // heads, block_size=16, max_past_horizon=64
    )
    return sl.Serial.Config(
        (
            _half_ffn(d_model, ffn),
            _attention_residual(attention, d_model),
            sl.Residual.Config(
                (
                    sl.LayerNormalization.Config(),
                    sl.Dense.Config(2 * d_model),
                    sl.GatedLinearUnit.Config(),
                    sl.DepthwiseConv1D.Config(kernel_size=15, padding="causal"),
                    sl.LayerNormalization.Config(),
                    sl.Swish.Config(),
                    sl.Dense.Config(d_model),
                )
            ),
            _half_ffn(d_model, ffn),
            sl.LayerNormalization.Config(),
        )
    )


def _cases() -> dict[str, CaseFn]:
    return {
        "conv1d causal x4": lambda: (_conv_stack([(3, 1, 1), (5, 1, 1), (3, 1, 1), (5, 1, 1)]), 80),
        "conv1d strided x2": lambda: (_conv_stack([(4, 2, 1), (4, 2, 1)]), 80),
        "conv1d dilated x4": lambda: (
            _conv_stack([(3, 1, 1), (3, 1, 2), (3, 1, 4), (3, 1, 8)]),
            128,
        ),
        "depthwise conv x2": lambda: (
            sl.Serial.Config(
                tuple(sl.DepthwiseConv1D.Config(kernel_size=15, padding="causal") for _ in range(2))
            ),
            256,
        ),
        "lstm x2": lambda: (
            sl.Serial.Config(tuple(sl.LSTM.Config(units=128) for _ in range(2))),
            80,
        ),
        # The reference has no GRU or plain RNN: its side runs _ScanRNN.
        "gru x2 (ref: lax.scan)": lambda: (
            sl.Serial.Config(tuple(sl.GRU.Config(units=128) for _ in range(2)))
            if SIDE == "ours"
            else "gru",
            80,
        ),
        "rnn x2 (ref: lax.scan)": lambda: (
            sl.Serial.Config(tuple(sl.RNN.Config(units=256) for _ in range(2)))
            if SIDE == "ours"
            else "rnn",
            80,
        ),
        "dsa block d256": lambda: (
            _block(
                sl.DotProductSelfAttention.Config(
                    num_heads=4, units_per_head=64, max_past_horizon=64
                ),
                256,
                1024,
            ),
            256,
        ),
        "local dsa block d144": lambda: (
            _block(
                sl.LocalDotProductSelfAttention.Config(
                    num_heads=4, units_per_head=36, block_size=16, max_past_horizon=64
                ),
                144,
                576,
            ),
            144,
        ),
        "conformer block d144": lambda: (_conformer(144, 4, 576), 144),
        "stft logmel (samples)": lambda: (
            sl.Serial.Config(
                (
                    sl.STFT.Config(
                        frame_length=400,
                        frame_step=160,
                        fft_length=512,
                        time_padding="causal",
                        output_magnitude=True,
                    ),
                    sl.LinearToMelSpectrogram.Config(
                        num_mel_bins=80,
                        sample_rate=16000.0,
                        lower_edge_hertz=125.0,
                        upper_edge_hertz=7600.0,
                    ),
                    sl.Add.Config(1e-6),
                    sl.Log.Config(),
                )
            ),
            0,
        ),
        "residual mlp x2": lambda: (
            sl.Serial.Config(
                tuple(
                    sl.Residual.Config(
                        (
                            sl.LayerNormalization.Config(),
                            sl.Dense.Config(512, activation=jax.nn.gelu),
                            sl.Dense.Config(128),
                        )
                    )
                    for _ in range(2)
                )
            ),
            128,
        ),
    }


class _ScanRNN:
    """A plain `lax.scan` GRU or Elman RNN stack: what a user of the reference
    (which has neither) would write, with per-frame input and recurrent
    projections in the scan body and the state carried through invalid
    frames. Same parameter names and layout as ours, so ours copy across."""

    def __init__(self, kind: str, layers: int, units: int) -> None:
        self.kind, self.layers, self.units = kind, layers, units
        self.gates = 3 if kind == "gru" else 1

    def init(self, key: jax.Array, channels: int) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for i in range(self.layers):
            d = channels if i == 0 else self.units
            k1, k2, key = jax.random.split(key, 3)
            g = self.gates * self.units
            params[f"layers_{i}"] = {
                "kernel": {"kernel": jax.random.normal(k1, (d, g)) / np.sqrt(d)},
                "recurrent_kernel": {"kernel": jax.random.normal(k2, (self.units, g)) * 0.1},
                "bias": jnp.zeros((g,)),
            }
            if self.kind == "gru":
                params[f"layers_{i}"]["recurrent_bias"] = jnp.zeros((g,))
        return {"params": params}

    def _cell(self, p: dict[str, Any], x_t: jax.Array, h: jax.Array) -> jax.Array:
        xw = x_t @ p["kernel"]["kernel"] + p["bias"]
        hu = h @ p["recurrent_kernel"]["kernel"]
        if self.kind == "rnn":
            return jnp.tanh(xw + hu)
        hu = hu + p["recurrent_bias"]
        xz, xr, xn = jnp.split(xw, 3, axis=-1)
        hz, hr, hn = jnp.split(hu, 3, axis=-1)
        z = jax.nn.sigmoid(xz + hz)
        r = jax.nn.sigmoid(xr + hr)
        n = jnp.tanh(xn + r * hn)
        return z * h + (1 - z) * n

    def _one(self, p: dict[str, Any], x: jax.Array, mask: jax.Array, h: jax.Array) -> Any:
        def body(h: jax.Array, inputs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            x_t, m_t = inputs
            new = jnp.where(m_t[:, None], self._cell(p, x_t, h), h)
            return new, jnp.where(m_t[:, None], new, 0.0)

        h, ys = jax.lax.scan(body, h, (jnp.swapaxes(x, 0, 1), jnp.swapaxes(mask, 0, 1)))
        return jnp.swapaxes(ys, 0, 1), h

    def layer(self, variables: Any, values: jax.Array, mask: jax.Array) -> jax.Array:
        state = self.initial_state(values.shape[0])
        return self.step(variables, values, mask, state)[0]

    def initial_state(self, batch: int) -> Any:
        return tuple(jnp.zeros((batch, self.units)) for _ in range(self.layers))

    def step(self, variables: Any, values: jax.Array, mask: jax.Array, state: Any) -> Any:
        new = []
        x = jnp.where(mask[..., None], values, 0.0)
        for i in range(self.layers):
            x, h = self._one(variables["params"][f"layers_{i}"], x, mask, state[i])
            new.append(h)
        return x, tuple(new)


def _flat(tree: Any) -> dict[str, np.ndarray]:
    tree = nn.meta.unbox(flax.core.unfreeze(tree))
    return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


def _copy_params(ours: dict[str, np.ndarray], theirs: Any) -> tuple[Any, int, int]:
    """Overwrites every leaf of `theirs` that has a counterpart in `ours` (same
    path and shape); returns the new tree and how many leaves were copied."""
    flat = _flat(theirs)
    copied = 0
    for key, value in flat.items():
        if key in ours and ours[key].shape == value.shape:
            flat[key] = ours[key]
            copied += 1
    tree = flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
    return tree, copied, len(flat)


_METADATA = re.compile(r", metadata=\{[^}]*\}")
_NAME = re.compile(r"%[\w.\-]+|\b[A-Za-z_][\w\-]*(?:\.\d+)+\b")


def program_text(hlo: str) -> str:
    """An optimized HLO module's computations with everything that names
    where they came from taken out: source metadata, the module's name and
    file tables, and instruction and computation names (renumbered in order
    of appearance). Two libraries that lower a call to the same program give
    the same text."""
    lines = [
        _METADATA.sub("", line)
        for line in hlo.splitlines()
        if line.lstrip().startswith(("%", "ROOT ", "ENTRY ", "}"))
    ]
    names: dict[str, str] = {}

    def rename(m: re.Match[str]) -> str:
        return names.setdefault(m.group(0).lstrip("%"), f"%n{len(names)}")

    return "\n".join(_NAME.sub(rename, line) for line in lines)


# The ops that carry a program's arithmetic on CPU; what is left between
# them is elementwise work XLA fuses into loops.
_KERNELS = ("dot", "convolution", "fft", "custom-call")
_INSTRUCTION = re.compile(r"= (\S+) ([\w\-]+)\((.*?)\)(.*)$")


def kernel_signature(text: str) -> list[str]:
    """The dots, convolutions, FFTs and library calls of a `program_text`:
    each as its opcode, result type and attributes (operands left out:
    their names are numbered per program), sorted. Equal for two programs
    whose arithmetic is the same calls, whatever glue surrounds them."""
    out = []
    for line in text.splitlines():
        m = _INSTRUCTION.search(line)
        if m and m.group(2) in _KERNELS:
            out.append(f"{m.group(2)} {m.group(1)}{m.group(4)}")
    return sorted(out)


class Case:
    """A built case: jitted layer and step functions plus their inputs."""

    def __init__(self, req: dict[str, Any]) -> None:
        name, batch = req["case"], req["batch"]
        config, channels = _cases()[name]()
        rng = np.random.default_rng(0)
        if isinstance(config, str):  # a plain lax.scan stack (see _ScanRNN)
            self._build_plain(config, rng, batch, req["units"], channels, req)
            return
        model = config.make()
        # Properties only: binding creates no parameters.
        block_size = int(model.apply({}, method=lambda m: m.block_size))
        frames = req["units"] * block_size
        lengths = np.full([batch], frames)
        # Ragged batch: the last row is shorter, so masking is exercised.
        lengths[-1] = frames - frames // 4
        # channels == 0: no channel axis (a waveform is [b, t]).
        shape = (batch, frames, channels) if channels else (batch, frames)
        values = rng.normal(size=shape).astype(np.float32)
        mask = np.arange(frames)[None, :] < lengths[:, None]
        x = sl.Sequence(jnp.asarray(values), jnp.asarray(mask))
        variables = model.init(jax.random.PRNGKey(0), x, training=False)
        variables = nn.meta.unbox(flax.core.unfreeze(variables))
        copied, total = len(_flat(variables)), len(_flat(variables))
        if req.get("params_in"):
            ours = dict(np.load(req["params_in"]))
            variables, copied, total = _copy_params(ours, variables)
        self.params_out = str(Path(req["dump"]) / f"{SIDE}_params.npz")
        np.savez(self.params_out, **_flat(variables))
        self.copied, self.total = copied, total
        self.block_size = block_size
        self.x, self.batch, self.frames = x, batch, frames

        def layer(v: Any, x: Any) -> Any:
            y = model.apply(v, x, training=False, method=model.layer)
            return y.values, y.mask

        def step(v: Any, x: Any, s: Any) -> Any:
            y, s = model.apply(v, x, s, training=False, method=model.step)
            return (y.values, y.mask), s

        def init_state() -> Any:
            return model.apply(
                variables, batch, x.channel_spec, training=False, method=model.get_initial_state
            )

        self._setup(variables, layer, step, init_state, lambda t: x[:, t[0] : t[1]], req)

    def _build_plain(
        self,
        kind: str,
        rng: np.random.Generator,
        batch: int,
        frames: int,
        channels: int,
        req: dict[str, Any],
    ) -> None:
        model = _ScanRNN(kind, 2, 128 if kind == "gru" else 256)
        lengths = np.full([batch], frames)
        lengths[-1] = frames - frames // 4
        values = jnp.asarray(rng.normal(size=(batch, frames, channels)).astype(np.float32))
        mask = jnp.asarray(np.arange(frames)[None, :] < lengths[:, None])
        variables = model.init(jax.random.PRNGKey(0), channels)
        copied = total = len(_flat(variables))
        if req.get("params_in"):
            variables, copied, total = _copy_params(dict(np.load(req["params_in"])), variables)
        self.params_out = str(Path(req["dump"]) / f"{SIDE}_params.npz")
        np.savez(self.params_out, **_flat(variables))
        self.copied, self.total, self.block_size = copied, total, 1
        self.batch, self.frames = batch, frames

        def layer(v: Any, x: Any) -> Any:
            return model.layer(v, *x), x[1]

        def step(v: Any, x: Any, s: Any) -> Any:
            y, s = model.step(v, x[0], x[1], s)
            return (y, x[1]), s

        self._setup(
            variables,
            layer,
            step,
            lambda: model.initial_state(batch),
            lambda t: (values[:, t[0] : t[1]], mask[:, t[0] : t[1]]),
            req,
        )
        self.x = (values, mask)

    def _setup(
        self,
        variables: Any,
        layer: Callable[..., Any],
        step: Callable[..., Any],
        init_state: Callable[[], Any],
        chunk: Callable[[tuple[int, int]], Any],
        req: dict[str, Any],
    ) -> None:
        self.variables = variables
        self.layer_fn = jax.jit(layer)
        self.step_fn = jax.jit(step, donate_argnums=(2,))
        self.init_state = jax.jit(init_state)
        self.timers: dict[str, Callable[[], None]] = {}
        outputs: dict[str, np.ndarray] = {}
        full = chunk((0, self.frames))
        y = jax.block_until_ready(self.layer_fn(variables, full))
        outputs["layer_values"], outputs["layer_mask"] = np.asarray(y[0]), np.asarray(y[1])
        self.timers["layer"] = lambda: jax.block_until_ready(self.layer_fn(variables, full))
        # What each call compiles to, for `program_text` (lowered lazily: the
        # driver asks only when it compares programs).
        self.lowerings: dict[str, Callable[[], Any]] = {
            "layer": lambda: self.layer_fn.lower(variables, full)
        }
        for blocks in req["blocks"]:
            block = self.block_size * blocks
            steps = self.frames // block
            chunks = [chunk((i * block, (i + 1) * block)) for i in range(steps)]
            state = self.init_state()
            ys = []
            for c in chunks:  # also compiles
                y, state = self.step_fn(variables, c, state)
                ys.append(y)
            outputs[f"step{blocks}_values"] = np.concatenate([np.asarray(y[0]) for y in ys], 1)
            outputs[f"step{blocks}_mask"] = np.concatenate([np.asarray(y[1]) for y in ys], 1)
            self.timers[f"step{blocks}"] = self._step_timer(chunks)
            first = chunks[0]
            self.lowerings[f"step{blocks}"] = lambda c=first: self.step_fn.lower(
                variables, c, self.init_state()
            )
        self.outputs_out = str(Path(req["dump"]) / f"{SIDE}_outputs.npz")
        np.savez(self.outputs_out, **outputs)

    def _step_timer(self, chunks: list[Any]) -> Callable[[], None]:
        def run() -> None:
            state = self.init_state()
            y = None
            for c in chunks:
                y, state = self.step_fn(self.variables, c, state)
            jax.block_until_ready(y)

        return run


def main() -> None:
    case: Case | None = None
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "build":
                case = Case(req)
                reply: dict[str, Any] = {
                    "ok": True,
                    "side": SIDE,
                    "params_out": case.params_out,
                    "outputs_out": case.outputs_out,
                    "copied": case.copied,
                    "total": case.total,
                    "block_size": case.block_size,
                    "frames": case.frames,
                }
            elif req["op"] == "time":
                assert case is not None
                fn = case.timers[req["what"]]
                # One timing = the mean over as many runs as fill
                # `min_seconds`, so short calls are not all timer noise.
                start, runs = time.perf_counter(), 0
                while True:
                    fn()
                    runs += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= req.get("min_seconds", 0.0):
                        break
                reply = {"ok": True, "seconds": elapsed / runs}
            elif req["op"] == "program":
                assert case is not None
                compiled = case.lowerings[req["what"]]().compile()
                text = program_text(compiled.as_text())
                reply = {"ok": True, "program": text, "kernels": kernel_signature(text)}
            elif req["op"] == "info":
                reply = {"ok": True, "side": SIDE, "jax": jax.__version__, "cases": list(_cases())}
            else:
                reply = {"ok": False, "error": f"unknown op {req['op']!r}"}
        except Exception as e:  # reported to the driver, which prints it and moves on
            reply = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc(),
            }
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
