"""Tests for `sequence_layers.serialization`: configs as canonical JSON."""

from __future__ import annotations

import dataclasses
import doctest
import enum
import importlib
import inspect
import json
import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import serialization, types
from sequence_layers.sequence import Sequence

# Toy types (defined outside the package, so enums / plain dataclasses need
# register_type; SequenceLayerConfig subclasses are discovered) ---------------


@serialization.register_type(name="test_serialization.Color")
class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@serialization.register_type(name="test_serialization.Projection")
@dataclasses.dataclass(frozen=True)
class Projection:
    """A non-layer frozen config used as a field (like attention projections)."""

    scale: float = 1.0
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.zeros_init()  # noqa: RUF009 (what the reference does)


def _identity_fn(x: jax.Array) -> jax.Array:
    return x


class SerToyLeaf(types.StatelessPointwise):
    """Identity layer whose Config has one field of every supported kind."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Some int.
        units: int
        # A registered activation.
        activation: Callable[[jax.Array], jax.Array] | None = jax.nn.relu
        # Flax default initializer objects.
        kernel_init: Any = nn.linear.default_kernel_init
        bias_init: Any = nn.initializers.zeros_init()  # noqa: RUF009 (what the reference does)
        # A closure created as a default: serialized as "SerToyLeaf.recurrent_init".
        recurrent_init: Any = nn.initializers.orthogonal()  # noqa: RUF009 (what the reference does)
        # A jnp scalar type.
        param_dtype: Any = jnp.float32
        # A Fraction.
        ratio: Fraction = Fraction(1, 2)
        # An enum.
        color: Color = Color.RED
        # A non-finite float.
        horizon: float = math.inf
        # A nested non-layer config.
        projection: Projection = Projection()
        # A tuple.
        shape: tuple[int, ...] = (1, 2)
        name: str | None = None

        def make(self) -> SerToyLeaf:
            return SerToyLeaf(self, name=self.name)

    config: Config

    def layer(self, x: Sequence, *, training: bool, constants: Any = None) -> Sequence:
        return x


class SerToyStack(types.StatelessPointwise):
    """Holds a tuple of child configs, like a combinator."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Child configs.
        layers: tuple[types.SequenceLayerConfig, ...]
        name: str | None = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "layers", tuple(self.layers))

        def make(self) -> SerToyStack:
            return SerToyStack(self, name=self.name)

    config: Config

    def layer(self, x: Sequence, *, training: bool, constants: Any = None) -> Sequence:
        return x


def _strict_json(text: str) -> Any:
    def reject(token: str) -> Any:
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


def _round_trip(value: Any) -> Any:
    text = serialization.dumps(value)
    _strict_json(text)
    restored = serialization.loads(text)
    assert serialization.dumps(restored) == text
    return restored


def _assert_identical(a: Any, b: Any) -> None:
    """Equal and of the same types all the way down (tuple stays tuple, nan is nan)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_identical(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_identical(a[k], b[k])
    else:
        assert a == b, (a, b)


# Round trips ----------------------------------------------------------------

_TOY_CONFIGS = {
    "defaults": SerToyLeaf.Config(3),
    "every_field": SerToyLeaf.Config(
        units=4,
        activation=jnp.tanh,
        kernel_init=serialization.initializer("normal", stddev=0.02),
        bias_init=serialization.initializer("constant", 0.5),
        param_dtype=jnp.bfloat16,
        ratio=Fraction(3),
        color=Color.BLUE,
        horizon=-math.inf,
        projection=Projection(0.5, np.dtype("float16"), nn.initializers.ones_init()),
        shape=((1, 2), (), (3,)),
        name="leaf",
    ),
    "nested": SerToyStack.Config(
        (
            SerToyLeaf.Config(1, activation=None),
            SerToyStack.Config((SerToyLeaf.Config(2, horizon=math.nan),)),
            SerToyStack.Config(()),
        ),
        name="stack",
    ),
}


@pytest.mark.parametrize("key", sorted(_TOY_CONFIGS))
def test_toy_config_round_trip(key: str) -> None:
    config = _TOY_CONFIGS[key]
    restored = _round_trip(config)
    assert type(restored) is type(config)
    assert restored == config
    assert hash(restored) == hash(config)
    # Defaults come back as the very same objects (closures included).
    leaf = restored if key != "nested" else restored.layers[0]
    original = config if key != "nested" else config.layers[0]
    assert leaf.recurrent_init is original.recurrent_init
    assert leaf.kernel_init is original.kernel_init or isinstance(
        leaf.kernel_init, serialization.Initializer
    )


@pytest.mark.parametrize(
    "value",
    [
        [1, (2, [3, (4,)]), [], ()],
        {"a": (1, 2), "b": [None], (1, "x"): (Fraction(1, 2),)},
        (math.inf, -math.inf, math.nan, -0.0, 1e-300, 2**70, -(2**63)),
        (1 + 2j, complex(math.inf, -1.0), Fraction(-7, 3), Fraction(4)),
        (np.float32(1.5), np.int8(-3), np.bool_(True), np.float64(0.1), np.complex64(1j)),
        (jnp.float32, jnp.bfloat16, jnp.int32, jnp.bool_, jnp.complex64),
        (np.dtype("float32"), np.dtype(jnp.bfloat16), np.float16, np.int64, float, int),
        (None, True, False, "", "naïve ☃ \"quoted\"", 0),
        (types.PaddingMode.CAUSAL, jax.lax.Precision.HIGHEST, Color.BLUE),
    ],
    ids=["list_vs_tuple", "dict", "floats", "numbers", "np_scalars", "jnp_dtypes", "np_dtypes",
         "primitives", "enums"],
)  # fmt: skip
def test_value_round_trip(value: Any) -> None:
    _assert_identical(_round_trip(value), value)


def test_dtypes_keep_their_kind() -> None:
    d = serialization.to_dict((jnp.bfloat16, np.dtype("bfloat16"), np.float32))["config"]
    assert d == {
        "tuple": [
            {"dtype": "bfloat16"},
            {"dtype": "bfloat16", "as": "numpy.dtype"},
            {"dtype": "float32", "as": "numpy.type"},
        ]
    }


def test_dumps_is_canonical_json() -> None:
    config = _TOY_CONFIGS["every_field"]
    text = serialization.dumps(config)
    assert text == serialization.dumps(SerToyLeaf.Config(**_fields(config)))
    d = _strict_json(text)
    assert d["format"] == serialization.FORMAT == "sequence_layers.config"
    # The oldest version that reads it: 1 without layer modules.
    assert d["version"] == 1 and serialization.VERSION == 2
    assert d["config"]["type"] == "SerToyLeaf"
    assert list(d["config"]["fields"]) == sorted(d["config"]["fields"])
    assert d["config"]["fields"]["activation"] == {"callable": "tanh"}
    assert d["config"]["fields"]["kernel_init"] == {
        "initializer": "normal",
        "kwargs": {"stddev": 0.02},
    }
    # to_dict / from_dict are the same document, ready to embed in a model.json.
    assert serialization.to_dict(config) == d
    assert serialization.from_dict(d) == config
    indented = serialization.dumps(config, indent=2)
    assert "\n" in indented
    assert serialization.loads(indented) == config


def _fields(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


# Callables --------------------------------------------------------------------


def test_builtin_callables_round_trip_by_identity() -> None:
    values = (
        jax.nn.relu,
        jax.nn.gelu,
        jax.nn.sigmoid,
        jnp.tanh,
        jax.nn.tanh,
        jnp.exp,
        nn.initializers.zeros_init(),
        nn.initializers.ones_init(),
        nn.linear.default_kernel_init,
    )
    d = serialization.to_dict(values)["config"]["tuple"]
    assert [x["callable"] for x in d] == [
        "relu",
        "gelu",
        "sigmoid",
        "tanh",
        "tanh",
        "exp",
        "zeros",
        "ones",
        "default_kernel_init",
    ]
    restored = serialization.loads(serialization.dumps(values))
    assert all(a is b for a, b in zip(restored, values))
    # Aliases load too.
    doc = {"format": serialization.FORMAT, "version": 1, "config": {"callable": "jax.nn.relu"}}
    assert serialization.from_dict(doc) is jax.nn.relu


def test_package_functions_round_trip_by_path() -> None:
    signal = pytest.importorskip("sequence_layers.signal")
    fn = signal.hann_window
    d = serialization.to_dict(fn)["config"]
    assert d == {"callable": "sequence_layers.signal.hann_window"}
    assert serialization.from_dict(serialization.to_dict(fn)) is fn


def test_register_callable() -> None:
    def my_activation(x: jax.Array) -> jax.Array:
        return 2 * x

    with pytest.raises(serialization.SerializationError) as e:
        serialization.dumps(SerToyLeaf.Config(1, activation=my_activation))
    message = str(e.value)
    assert "Unregistered callable <function" in message
    assert "register_callable('my_activation', my_activation)" in message
    assert "known: " in message and "relu" in message and "gelu" in message

    serialization.register_callable("test_serialization.my_activation", my_activation)
    config = SerToyLeaf.Config(1, activation=my_activation)
    restored = _round_trip(config)
    assert restored == config and restored.activation is my_activation
    # Re-registering the same object is fine; stealing a name is not.
    serialization.register_callable("test_serialization.my_activation", my_activation)
    with pytest.raises(ValueError, match="already registered"):
        serialization.register_callable("test_serialization.my_activation", _identity_fn)


def test_initializer_behaves_like_flax() -> None:
    key = jax.random.PRNGKey(0)
    init = serialization.initializer("normal", stddev=0.02)
    assert init == serialization.initializer("normal", 0.02)
    assert hash(init) == hash(serialization.initializer("normal", 0.02))
    assert repr(init) == "initializer('normal', stddev=0.02)"
    np.testing.assert_array_equal(init(key, (3, 4)), nn.initializers.normal(0.02)(key, (3, 4)))
    assert init(key, (2,), jnp.bfloat16).dtype == jnp.bfloat16
    # Arguments equal to the factory default are dropped: one canonical form.
    assert serialization.initializer("normal") == serialization.initializer("normal", stddev=0.01)
    # Lists become tuples (hashable) and still work.
    vs = serialization.initializer("lecun_normal", in_axis=-3, out_axis=[-2, -1])
    assert vs.kwargs == (("in_axis", -3), ("out_axis", (-2, -1)))
    expected = nn.initializers.lecun_normal(in_axis=-3, out_axis=[-2, -1])(key, (4, 2, 3))
    np.testing.assert_array_equal(vs(key, (4, 2, 3)), expected)
    # Usable as a flax param initializer.
    params = nn.Dense(3, kernel_init=init).init(key, jnp.ones((1, 2)))
    expected = nn.Dense(3, kernel_init=nn.initializers.normal(0.02)).init(key, jnp.ones((1, 2)))
    np.testing.assert_array_equal(params["params"]["kernel"], expected["params"]["kernel"])


def test_initializer_errors() -> None:
    with pytest.raises(serialization.SerializationError, match="Unknown initializer 'nromal'"):
        serialization.initializer("nromal")
    with pytest.raises(serialization.SerializationError, match="did you mean normal"):
        serialization.initializer("nromal")
    with pytest.raises(serialization.SerializationError, match="Bad arguments"):
        serialization.initializer("normal", sigma=1.0)


@pytest.mark.parametrize(
    "make_init",
    [
        lambda: nn.initializers.lecun_normal(in_axis=-3, out_axis=[-2, -1]),
        lambda: nn.initializers.normal(0.05, dtype=jnp.bfloat16),
        lambda: nn.initializers.orthogonal(scale=2.0),
        lambda: nn.initializers.truncated_normal(0.3),
    ],
    ids=["lecun_normal", "normal_bf16", "orthogonal", "truncated_normal"],
)
def test_raw_flax_initializer_loads_as_equivalent(make_init: Callable[[], Any]) -> None:
    raw = make_init()
    restored = serialization.loads(serialization.dumps(raw))
    assert isinstance(restored, serialization.Initializer)
    assert serialization.dumps(restored) == serialization.dumps(raw)
    key = jax.random.PRNGKey(1)
    expected = raw(key, (4, 2, 3))
    actual = restored(key, (4, 2, 3))
    assert actual.dtype == expected.dtype
    np.testing.assert_array_equal(actual, expected)


# Errors -----------------------------------------------------------------------


def _doc(config: Any) -> dict[str, Any]:
    return json.loads(serialization.dumps(config))


def test_unknown_layer_type_lists_known_types() -> None:
    d = _doc(SerToyLeaf.Config(1))
    d["config"]["type"] = "SerToyLeef"
    with pytest.raises(serialization.SerializationError) as e:
        serialization.from_dict(d)
    message = str(e.value)
    assert "Unknown layer type 'SerToyLeef'" in message
    assert "did you mean SerToyLeaf" in message
    assert "known: " in message and "SerToyStack" in message


def test_unknown_names_fail_clearly() -> None:
    d = _doc(SerToyLeaf.Config(1))
    d["config"]["fields"]["activation"] = {"callable": "relu7"}
    with pytest.raises(serialization.SerializationError, match=r"Unknown callable 'relu7'.*relu6"):
        serialization.from_dict(d)

    d = _doc(SerToyLeaf.Config(1))
    d["config"]["fields"]["bogus"] = 1
    with pytest.raises(serialization.SerializationError, match=r"Unknown field\(s\) \['bogus'\]"):
        serialization.from_dict(d)

    d = _doc(SerToyLeaf.Config(1))
    d["config"]["fields"]["color"]["name"] = "GREEN"
    with pytest.raises(serialization.SerializationError, match=r"members: \['RED', 'BLUE'\]"):
        serialization.from_dict(d)

    d = _doc(SerToyLeaf.Config(1))
    d["config"]["fields"]["param_dtype"] = {"dtype": "float33"}
    with pytest.raises(serialization.SerializationError, match="Unknown dtype 'float33'"):
        serialization.from_dict(d)

    d = _doc(SerToyLeaf.Config(1))
    del d["config"]["fields"]["units"]
    with pytest.raises(serialization.SerializationError, match="Cannot build SerToyLeaf"):
        serialization.from_dict(d)

    d = _doc(SerToyLeaf.Config(1))
    d["config"]["fields"]["shape"] = {"tuple": [1], "extra": 2}
    with pytest.raises(serialization.SerializationError, match="unexpected keys"):
        serialization.from_dict(d)


def test_version_and_format_checks() -> None:
    d = _doc(SerToyLeaf.Config(1))
    newer = serialization.VERSION + 1
    with pytest.raises(serialization.SerializationError, match=rf"version {newer}, newer.*Upgrade"):
        serialization.from_dict({**d, "version": newer})
    assert serialization.from_dict({**d, "version": serialization.VERSION}) == SerToyLeaf.Config(1)
    with pytest.raises(serialization.SerializationError, match="Invalid"):
        serialization.from_dict({**d, "version": "1"})
    with pytest.raises(serialization.SerializationError, match="Not a serialized"):
        serialization.from_dict({**d, "format": "other"})
    with pytest.raises(serialization.SerializationError, match="Not a serialized"):
        serialization.loads("[1, 2]")
    with pytest.raises(serialization.SerializationError, match="Invalid JSON"):
        serialization.loads("{")


def test_unregistered_and_unsupported_values() -> None:
    class Shade(enum.Enum):
        DARK = 1

    @dataclasses.dataclass(frozen=True)
    class Loose:
        x: int = 0

    with pytest.raises(serialization.SerializationError, match=r"register_type\(Shade\)"):
        serialization.dumps(Shade.DARK)
    with pytest.raises(serialization.SerializationError, match=r"register_type\(Loose\)"):
        serialization.dumps((Loose(),))
    with pytest.raises(serialization.SerializationError, match="Cannot serialize"):
        serialization.dumps(SerToyLeaf.Config(1, shape=(object(),)))  # type: ignore[arg-type]
    with pytest.raises(serialization.SerializationError, match="Cannot serialize"):
        serialization.dumps(np.zeros(3))

    serialization.register_type(Shade, name="test_serialization.Shade")
    assert _round_trip(Shade.DARK) is Shade.DARK


def _define_twin_a() -> type:
    class Twin(types.StatelessPointwise):
        @dataclasses.dataclass(frozen=True)
        class Config(types.SequenceLayerConfig):
            # Anything.
            size: int = 1
            name: str | None = None

            def make(self) -> Twin:
                return Twin(self, name=self.name)

        config: Config

    return Twin


def _define_twin_b() -> type:
    class Twin(types.StatelessPointwise):
        @dataclasses.dataclass(frozen=True)
        class Config(types.SequenceLayerConfig):
            # Anything.
            size: int = 2
            name: str | None = None

            def make(self) -> Twin:
                return Twin(self, name=self.name)

        config: Config

    return Twin


def test_ambiguous_short_names_use_qualified_names() -> None:
    for twin in (_define_twin_a(), _define_twin_b()):
        config = twin.Config(size=3)
        d = _doc(config)
        assert d["config"]["type"].endswith("<locals>.Twin.Config")
        assert serialization.from_dict(d) == config
    d["config"]["type"] = "Twin"
    with pytest.raises(serialization.SerializationError, match="Ambiguous type name 'Twin'"):
        serialization.from_dict(d)


def test_package_layers_keep_their_short_names() -> None:
    dense = pytest.importorskip("sequence_layers.dense")

    class Dense(types.StatelessPointwise):
        @dataclasses.dataclass(frozen=True)
        class Config(types.SequenceLayerConfig):
            # Anything.
            features: int = 1
            name: str | None = None

            def make(self) -> Dense:
                return Dense(self, name=self.name)

        config: Config

    assert _doc(dense.Dense.Config(2))["config"]["type"] == "Dense"
    mine = Dense.Config(3)
    assert _doc(mine)["config"]["type"].endswith("<locals>.Dense.Config")
    assert _round_trip(mine) == mine


# Discovery ----------------------------------------------------------------------


def _package_config_classes() -> list[type]:
    classes = []
    stack = [types.SequenceLayerConfig]
    while stack:
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            frozen = sub.__dataclass_params__.frozen and not inspect.isabstract(sub)
            if sub.__module__.startswith("sequence_layers.") and frozen:
                classes.append(sub)
    return classes


def test_discovery_finds_package_layers_and_their_defaults_serialize() -> None:
    """Every layer Config in sequence_layers is known by name, and every field
    default (initializers, activations, window functions, nested configs)
    round-trips to an equal (for callables: the identical) object."""
    known = serialization.known_types()  # Imports every sequence_layers module.
    assert serialization.known_types()["SerToyLeaf"] is SerToyLeaf.Config
    problems = []
    classes = _package_config_classes()
    for cls in classes:
        if cls not in known.values():
            problems.append(f"{cls.__module__}.{cls.__qualname__} not discovered")
            continue
        for field in dataclasses.fields(cls):
            if field.default is not dataclasses.MISSING:
                default = field.default
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:
                continue
            try:
                restored = serialization.loads(serialization.dumps(default))
            except serialization.SerializationError as e:
                problems.append(f"{cls.__qualname__}.{field.name}: {e}")
                continue
            if callable(default) and not isinstance(default, type):
                ok = restored is default or restored == default
            else:
                ok = restored == default and type(restored) is type(default)
            if not ok:
                problems.append(f"{cls.__qualname__}.{field.name}: {default!r} -> {restored!r}")
    assert not problems, "\n".join(problems)


def test_configs_defined_later_are_discovered() -> None:
    serialization.known_types()  # Build the catalog first.

    class LateLayer(types.StatelessPointwise):
        @dataclasses.dataclass(frozen=True)
        class Config(types.SequenceLayerConfig):
            # Anything.
            gain: float = 2.0
            name: str | None = None

            def make(self) -> LateLayer:
                return LateLayer(self, name=self.name)

        config: Config

    config = LateLayer.Config(gain=0.5)
    assert _doc(config)["config"]["type"] == "LateLayer"
    assert _round_trip(config) == config


# Real layers: config round trip and identical outputs ------------------------------


_EXAMPLES = [
    ("sequence_layers.dense", lambda m: m.Dense.Config(4, activation=jax.nn.gelu), (3,)),
    (
        "sequence_layers.convolution",
        lambda m: m.Conv1D.Config(3, kernel_size=3, padding="causal", name="conv"),
        (2,),
    ),
    ("sequence_layers.recurrent", lambda m: m.LSTM.Config(3), (2,)),
    ("sequence_layers.normalization", lambda m: m.LayerNormalization.Config(), (4,)),
    ("sequence_layers.stft", lambda m: m.STFT.Config(8, 4, 8, time_padding="causal"), ()),
    (
        "sequence_layers.attention",
        lambda m: m.DotProductSelfAttention.Config(2, 3, max_past_horizon=4),
        (4,),
    ),
    (
        "sequence_layers.combinators",
        lambda m: m.Serial.Config(
            (
                importlib.import_module("sequence_layers.convolution").Conv1D.Config(
                    4, 3, strides=2, padding="causal"
                ),
                importlib.import_module("sequence_layers.dense").Dense.Config(
                    2, kernel_init=serialization.initializer("normal", stddev=0.5)
                ),
            )
        ),
        (2,),
    ),
    (
        "sequence_layers.framewise",
        lambda m: importlib.import_module("sequence_layers.combinators").Serial.Config(
            (
                m.FramePad.Config((0, 2), mode="reflect"),
                m.PerFrame.Config(
                    importlib.import_module("sequence_layers.convolution").Conv1D.Config(
                        3, kernel_size=3, strides=2, padding="valid"
                    )
                ),
            )
        ),
        (6, 2),
    ),
]


@pytest.mark.parametrize(
    ("module", "build", "channel_shape"),
    _EXAMPLES,
    ids=[
        "Dense",
        "Conv1D",
        "LSTM",
        "LayerNormalization",
        "STFT",
        "SelfAttention",
        "Serial",
        "PerFrame",
    ],
)
def test_layer_example_round_trip(
    module: str, build: Callable[[Any], Any], channel_shape: tuple[int, ...]
) -> None:
    config = build(pytest.importorskip(module))
    restored = _round_trip(config)
    assert restored == config and hash(restored) == hash(config)

    rng = np.random.default_rng(0)
    values = jnp.asarray(rng.normal(size=(2, 8, *channel_shape)).astype(np.float32))
    x = Sequence(values, jnp.asarray([[True] * 8, [True] * 5 + [False] * 3]))
    layer = config.make()
    params = layer.init(jax.random.PRNGKey(0), x)
    y = layer.apply(params, x)
    y_restored = restored.make().apply(params, x)
    np.testing.assert_array_equal(np.asarray(y.mask), np.asarray(y_restored.mask))
    np.testing.assert_array_equal(np.asarray(y.values), np.asarray(y_restored.values))


def test_module_docstring_example_runs() -> None:
    pytest.importorskip("sequence_layers.dense")
    pytest.importorskip("sequence_layers.combinators")
    result = doctest.testmod(serialization, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
