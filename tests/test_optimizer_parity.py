"""Parity of the optimizer engine with real Keras 3.15 (NumPy backend), step by step.

Every case builds the same optimizer twice: in Keras from keyword arguments, and
in the engine from ``keras.optimizers.serialize`` of that Keras optimizer (which
must round-trip: the engine's ``get_config()`` equals it). Both then take the same
random gradients for several steps over variables of shapes (3, 4), (5,) and
(2, 3, 2); after build and after every step the variables, every slot (matched by
Keras's variable name ``<variable>_<slot>``), Nadam's ``u_product``, the public
and raw iteration counters and the learning rate must agree.

Tolerance: float32 cases hold rtol=1e-6 plus atol=1e-7 times the largest
magnitude of the compared array (or 1); float64 cases hold rtol=1e-12. On the
NumPy backend every case is in fact bit-identical to Keras (asserted for a
representative set below): the engine computes each step-dependent scalar in
the variable's dtype as Keras does and its kernels apply the same operations
in the same order. The tolerance leaves room only for backends whose
elementwise math may round differently (CuPy).

float64: Keras's type promotion narrows 64-bit results to 32 bits on every
backend but TensorFlow, so on the NumPy backend a float64 variable is updated
with float32 arithmetic. The engine keeps float64 in float64, as Keras on
TensorFlow does; the float64 oracle is the same Keras code with that one
promotion entry switched to TensorFlow's (see ``keras_float64_arithmetic``).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from optserve.server import optimizers

# Keras's own Variable.__array__ predates NumPy 2's `copy` keyword.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SHAPES = {"kernel": (3, 4), "bias": (5,), "conv_kernel": (2, 3, 2)}
STEPS = 6
FLOAT32_RTOL, FLOAT32_ATOL = 1e-6, 1e-7  # see the module docstring
FLOAT64_RTOL, FLOAT64_ATOL = 1e-12, 1e-13


class Case:
    """One parity run: a Keras optimizer class, its keyword arguments and how to drive it."""

    def __init__(self, class_name, dtype="float32", steps=STEPS, drop=None, exclude=None, grad_scale=1.0, **kwargs):
        self.class_name = class_name
        self.kwargs = kwargs
        self.dtype = dtype
        self.steps = steps
        # {step: [variable names without a gradient in that step]}
        self.drop = drop or {}
        self.exclude = exclude  # exclude_from_weight_decay(var_names=...)
        self.grad_scale = grad_scale

    def __repr__(self):
        parts = [f"{k}={_short(v)}" for k, v in self.kwargs.items()]
        if self.dtype != "float32":
            parts.append(self.dtype)
        if self.drop:
            parts.append("subset")
        if self.exclude:
            parts.append(f"exclude={self.exclude}")
        return f"{self.class_name}({', '.join(parts)})"


class Schedule:
    def __init__(self, class_name, **config):
        self.class_name = class_name
        self.config = config

    def keras(self):
        import keras

        return getattr(keras.optimizers.schedules, self.class_name)(**self.config)


def _short(value):
    return value.class_name if isinstance(value, Schedule) else value


OPTIMIZERS = [
    "SGD",
    "RMSprop",
    "Adam",
    "Adadelta",
    "Adagrad",
    "Adamax",
    "Nadam",
    "Ftrl",
    "AdamW",
    "Lion",
    "Lamb",
    "ScheduleFreeAdamW",
    "Adafactor",
    "Muon",
]
# LossScaleOptimizer wraps these; its parity runs (injected non-finite gradients) are in
# tests/test_keras3_optimizers.py.
WRAPPERS = {"lossscaleoptimizer"}

OWN_OPTIONS = [
    Case("SGD"),
    Case("SGD", learning_rate=0.1, momentum=0.9),
    Case("SGD", learning_rate=0.1, momentum=0.9, nesterov=True),
    Case("SGD", learning_rate=0.05, momentum=1.0, nesterov=True),
    Case("RMSprop"),
    Case("RMSprop", learning_rate=0.01, momentum=0.9),
    Case("RMSprop", learning_rate=0.01, centered=True),
    Case("RMSprop", learning_rate=0.01, rho=0.8, momentum=0.5, epsilon=1e-3, centered=True),
    Case("Adam"),
    Case("Adam", learning_rate=0.01, amsgrad=True),
    Case("Adam", learning_rate=0.02, beta_1=0.5, beta_2=0.9, epsilon=1e-3),
    Case("Adam", learning_rate=0.02, beta_1=0.0, beta_2=0.5, amsgrad=True),
    Case("Adadelta"),
    Case("Adadelta", learning_rate=1.0, rho=0.5, epsilon=1e-4),
    Case("Adagrad"),
    Case("Adagrad", learning_rate=0.1, initial_accumulator_value=0.5, epsilon=1e-3),
    Case("Adagrad", learning_rate=0.1, initial_accumulator_value=0.0),
    Case("Adamax"),
    Case("Adamax", learning_rate=0.02, beta_1=0.8, beta_2=0.99, epsilon=1e-4),
    Case("Nadam"),
    Case("Nadam", learning_rate=0.02, beta_1=0.8, beta_2=0.99, epsilon=1e-4),
    Case("Ftrl"),
    Case("Ftrl", learning_rate=0.1, l1_regularization_strength=0.05),
    Case("Ftrl", learning_rate=0.1, l2_regularization_strength=0.1, beta=0.5),
    Case(
        "Ftrl",
        learning_rate=0.1,
        l2_shrinkage_regularization_strength=0.05,
        learning_rate_power=-0.7,
        initial_accumulator_value=0.3,
    ),
    Case(
        "Ftrl",
        learning_rate=0.05,
        learning_rate_power=0.0,
        l1_regularization_strength=0.001,
        l2_regularization_strength=0.01,
        l2_shrinkage_regularization_strength=0.01,
        beta=0.1,
        initial_accumulator_value=0.0,
    ),
    Case("AdamW"),
    Case("AdamW", learning_rate=0.02, weight_decay=0.3, amsgrad=True),
    Case("AdamW", learning_rate=0.02, weight_decay=0.0, beta_1=0.5, beta_2=0.9, epsilon=1e-3),
    Case("Lion"),
    Case("Lion", learning_rate=0.01, beta_1=0.5, beta_2=0.9),
    Case("Lion", learning_rate=0.01, beta_1=1.0, beta_2=0.0, weight_decay=0.1),
    Case("Lamb"),
    Case("Lamb", learning_rate=0.02, beta_1=0.5, beta_2=0.9, epsilon=1e-3),
    Case("Lamb", learning_rate=0.05, beta_1=0.0, epsilon=0.0),
    Case("ScheduleFreeAdamW"),
    Case("ScheduleFreeAdamW", learning_rate=0.02, beta_1=0.5, beta_2=0.9, epsilon=1e-3),
    Case("ScheduleFreeAdamW", learning_rate=0.05, warmup_steps=3),
    Case("Adafactor"),
    Case(
        "Adafactor",
        learning_rate=0.05,
        relative_step=False,
        beta_2_decay=-0.5,
        epsilon_1=1e-20,
        epsilon_2=1e-2,
        clip_threshold=0.5,
    ),
    Case("Adafactor", learning_rate=0.5, clip_threshold=2.0),
    Case("Muon"),
    Case("Muon", learning_rate=0.02, nesterov=False, ns_steps=3, rms_rate=None, adam_lr_ratio=0.1),
    Case(
        "Muon",
        learning_rate=0.05,
        weight_decay=0.1,
        adam_weight_decay=0.2,
        momentum=0.5,
        muon_a=3.0,
        muon_b=-4.0,
        muon_c=2.0,
        exclude_layers=["conv"],
        adam_beta_1=0.5,
        adam_beta_2=0.9,
        epsilon=1e-3,
        rms_rate=0.5,
    ),
    Case("Muon", learning_rate=0.02, exclude_layers=["^kernel$"], exclude_embeddings=False, ns_steps=0),
]

# Learning rates large enough that every option visibly changes the result.
_LR = {
    "SGD": 0.1,
    "RMSprop": 0.01,
    "Adam": 0.02,
    "Adadelta": 1.0,
    "Adagrad": 0.1,
    "Adamax": 0.02,
    "Nadam": 0.02,
    "Ftrl": 0.1,
    "AdamW": 0.02,
    "Lion": 0.01,
    "Lamb": 0.02,
    "ScheduleFreeAdamW": 0.02,
    "Adafactor": 0.05,
    "Muon": 0.02,
}
COMMON_OPTIONS = [
    {"clipnorm": 0.5},
    {"clipvalue": 0.3},
    {"global_clipnorm": 1.0},
    {"weight_decay": 0.5},
    {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 3},
    {"gradient_accumulation_steps": 3, "steps": 7},
    {"loss_scale_factor": 128.0, "grad_scale": 128.0},
]
COMMON_CASES = [Case(name, learning_rate=_LR[name], **options) for name in OPTIMIZERS for options in COMMON_OPTIONS]

COMBINED_CASES = [
    Case(
        "Adam",
        learning_rate=0.02,
        gradient_accumulation_steps=2,
        clipnorm=0.5,
        loss_scale_factor=8.0,
        grad_scale=8.0,
        use_ema=True,
        ema_momentum=0.5,
        ema_overwrite_frequency=2,
        weight_decay=0.3,
        steps=9,
    ),
    Case(
        "RMSprop",
        learning_rate=0.01,
        momentum=0.5,
        centered=True,
        global_clipnorm=0.7,
        weight_decay=0.2,
        use_ema=True,
        ema_momentum=0.8,
        exclude=["bias"],
    ),
    Case(
        "SGD",
        learning_rate=0.1,
        momentum=0.9,
        nesterov=True,
        gradient_accumulation_steps=2,
        clipvalue=0.2,
        use_ema=True,
        steps=8,
        drop={1: ["bias"], 3: ["kernel", "bias"]},
    ),
    Case("Nadam", learning_rate=0.02, gradient_accumulation_steps=2, use_ema=True, ema_overwrite_frequency=1, steps=8),
    Case(
        "Ftrl",
        learning_rate=0.1,
        l1_regularization_strength=0.01,
        weight_decay=0.1,
        exclude=["conv", "bias"],
        clipnorm=1.0,
    ),
    Case("Adagrad", learning_rate=0.1, drop={0: ["conv_kernel"], 2: ["kernel"]}, global_clipnorm=1.5),
    Case("Adam", learning_rate=0.02, amsgrad=True, drop={1: ["kernel", "conv_kernel"], 4: ["bias"]}, weight_decay=0.1),
]

_SCHEDULES = [
    Schedule("ExponentialDecay", initial_learning_rate=0.05, decay_steps=2, decay_rate=0.5),
    Schedule("ExponentialDecay", initial_learning_rate=0.05, decay_steps=2, decay_rate=0.5, staircase=True),
    Schedule("PiecewiseConstantDecay", boundaries=[1, 3], values=[0.05, 0.02, 0.005]),
    Schedule("PolynomialDecay", initial_learning_rate=0.05, decay_steps=4, end_learning_rate=0.001, power=2.0),
    Schedule(
        "PolynomialDecay", initial_learning_rate=0.05, decay_steps=2, end_learning_rate=0.001, power=0.5, cycle=True
    ),
    Schedule("InverseTimeDecay", initial_learning_rate=0.05, decay_steps=1, decay_rate=0.5),
    Schedule("InverseTimeDecay", initial_learning_rate=0.05, decay_steps=2, decay_rate=0.5, staircase=True),
    Schedule("CosineDecay", initial_learning_rate=0.05, decay_steps=5, alpha=0.1),
    Schedule("CosineDecay", initial_learning_rate=0.001, decay_steps=4, warmup_target=0.05, warmup_steps=2),
    Schedule("CosineDecayRestarts", initial_learning_rate=0.05, first_decay_steps=2, t_mul=2.0, m_mul=0.5, alpha=0.1),
]
_SCHEDULE_OPTIMIZERS = [
    ("SGD", {"momentum": 0.9}),
    ("Adam", {}),
    ("Ftrl", {"l2_regularization_strength": 0.1, "beta": 0.2}),
    ("RMSprop", {"weight_decay": 0.5}),
    ("Nadam", {"gradient_accumulation_steps": 2, "steps": 7}),
]
SCHEDULE_CASES = [
    Case(name, learning_rate=schedule, **options)
    for index, schedule in enumerate(_SCHEDULES)
    for name, options in (_SCHEDULE_OPTIMIZERS[(index + shift) % 5] for shift in (0, 2, 4))
] + [
    # The newer optimizers, each under a few schedules.
    Case("AdamW", learning_rate=_SCHEDULES[0]),
    Case("AdamW", learning_rate=_SCHEDULES[8], gradient_accumulation_steps=2, steps=7),
    Case("Lion", learning_rate=_SCHEDULES[2]),
    Case("Lion", learning_rate=_SCHEDULES[7]),
    Case("Lamb", learning_rate=_SCHEDULES[4]),
    Case("Lamb", learning_rate=_SCHEDULES[9], weight_decay=0.2),
    Case("ScheduleFreeAdamW", learning_rate=_SCHEDULES[3]),
    Case("ScheduleFreeAdamW", learning_rate=_SCHEDULES[5], warmup_steps=2),
    Case("Adafactor", learning_rate=_SCHEDULES[1]),
    Case("Adafactor", learning_rate=_SCHEDULES[6], relative_step=False),
    Case("Muon", learning_rate=_SCHEDULES[0], adam_lr_ratio=0.1),
    Case("Muon", learning_rate=_SCHEDULES[8]),
]

FLOAT64_CASES = [
    Case("SGD", dtype="float64", learning_rate=0.1, momentum=0.9, nesterov=True, clipnorm=0.5),
    Case("SGD", dtype="float64", learning_rate=0.1, weight_decay=0.5, exclude=["bias"]),
    Case("RMSprop", dtype="float64", learning_rate=0.01, centered=True, momentum=0.3, weight_decay=0.5),
    Case("RMSprop", dtype="float64", learning_rate=0.01, global_clipnorm=1.0),
    Case("Adam", dtype="float64", learning_rate=0.02, amsgrad=True, global_clipnorm=1.0),
    Case("Adam", dtype="float64", learning_rate=_SCHEDULES[0]),
    Case("Adadelta", dtype="float64", learning_rate=1.0, use_ema=True, ema_overwrite_frequency=2),
    Case("Adagrad", dtype="float64", learning_rate=0.1, gradient_accumulation_steps=2, steps=7),
    Case("Adamax", dtype="float64", learning_rate=0.02, clipvalue=0.3, loss_scale_factor=4.0, grad_scale=4.0),
    Case("Nadam", dtype="float64", learning_rate=0.02, weight_decay=0.2),
    Case("Nadam", dtype="float64", learning_rate=_SCHEDULES[3], gradient_accumulation_steps=2, steps=7),
    Case(
        "Ftrl",
        dtype="float64",
        learning_rate=0.1,
        l1_regularization_strength=0.01,
        l2_regularization_strength=0.01,
        l2_shrinkage_regularization_strength=0.01,
        beta=0.1,
    ),
    Case("AdamW", dtype="float64", learning_rate=0.02, weight_decay=0.3, clipnorm=0.5),
    Case("Lion", dtype="float64", learning_rate=0.01, beta_1=0.7, use_ema=True),
    Case("Lamb", dtype="float64", learning_rate=0.02, global_clipnorm=1.0, weight_decay=0.1),
    Case(
        "ScheduleFreeAdamW", dtype="float64", learning_rate=0.02, warmup_steps=2, gradient_accumulation_steps=2, steps=7
    ),
    Case("Adafactor", dtype="float64", learning_rate=0.05, clipnorm=0.5),
    Case(
        "Muon",
        dtype="float64",
        learning_rate=0.02,
        adam_lr_ratio=0.1,
        weight_decay=0.3,
        loss_scale_factor=4.0,
        grad_scale=4.0,
    ),
]

FLOAT32_CASES = OWN_OPTIONS + COMMON_CASES + COMBINED_CASES + SCHEDULE_CASES
ALL_CASES = FLOAT32_CASES + FLOAT64_CASES


def _normalize(case):
    # `steps` and `grad_scale` in the option dicts drive the run; they are not arguments.
    for key in ("steps", "grad_scale"):
        if key in case.kwargs:
            setattr(case, key, case.kwargs.pop(key))
    return case


for _case in ALL_CASES:
    _normalize(_case)


def _inputs(case, seed=0):
    """Initial values and per-step gradients (None where a gradient is dropped)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(case.dtype)
    initial = {name: rng.normal(size=shape).astype(dtype) for name, shape in SHAPES.items()}
    steps = []
    for step in range(case.steps):
        grads = {name: (rng.normal(size=shape) * case.grad_scale).astype(dtype) for name, shape in SHAPES.items()}
        for name in case.drop.get(step, ()):
            grads[name] = None
        steps.append(grads)
    return initial, steps


def _spec(case):
    """What the Keras side needs to build the same optimizer."""
    kwargs = dict(case.kwargs)
    if isinstance(kwargs.get("learning_rate"), Schedule):
        schedule = kwargs["learning_rate"]
        kwargs["learning_rate"] = {"schedule": schedule.class_name, "config": schedule.config}
    return {"class_name": case.class_name, "kwargs": kwargs, "exclude": case.exclude, "dtype": case.dtype}


# ----------------------------------------------------------------- Keras side
def _value(keras_variable_or_array):
    """A Keras Variable's (or a backend tensor's) value as an ndarray of its declared dtype.

    (Keras's NumPy backend fills a float64 slot with float32 zeros at build; the
    slot's declared dtype is float64 and its first update makes it so.)
    """
    import keras

    value = np.asarray(keras.ops.convert_to_numpy(getattr(keras_variable_or_array, "value", keras_variable_or_array)))
    if isinstance(keras_variable_or_array, keras.Variable):
        return value.astype(keras_variable_or_array.dtype, copy=False)
    return value


def _keras_optimizer(spec):
    import keras

    kwargs = dict(spec["kwargs"])
    learning_rate = kwargs.get("learning_rate")
    if isinstance(learning_rate, dict):
        kwargs["learning_rate"] = getattr(keras.optimizers.schedules, learning_rate["schedule"])(
            **learning_rate["config"]
        )
    return getattr(keras.optimizers, spec["class_name"])(**kwargs)


def _keras_slots(optimizer, variables):
    """Keras's optimizer variables by name; Adafactor's r and c are named after the model
    variable itself (twice), so they are keyed here by the engine's names ``<variable>_r`` /
    ``<variable>_c`` (the placeholders Keras creates for small variables, int 0, as the
    variable's dtype)."""
    skipped = {id(optimizer._iterations), id(getattr(optimizer, "_u_product", None))}
    factors = {}
    if hasattr(optimizer, "_r") and hasattr(optimizer, "_c"):
        for (name, variable), r, c in zip(variables.items(), optimizer._r, optimizer._c):
            for slot, factor in (("r", r), ("c", c)):
                skipped.add(id(factor))
                factors[f"{name}_{slot}"] = _value(factor).astype(variable.dtype)
    slots = {v.name: _value(v) for v in optimizer.variables if id(v) not in skipped and v.name != "learning_rate"}
    return {**slots, **factors}


def _keras_snapshot(optimizer, variables):
    u_product = getattr(optimizer, "_u_product", None)
    return {
        "variables": {name: _value(variable) for name, variable in variables.items()},
        "slots": _keras_slots(optimizer, variables),
        "iterations": int(_value(optimizer.iterations)),
        "raw_iterations": int(_value(optimizer._iterations)),
        "u_product": None if u_product is None else _value(u_product),
        "learning_rate": float(_value(optimizer.learning_rate).astype(np.float32)),
    }


def keras_trajectory(spec, initial, steps):
    """Snapshots of real Keras after build and after every step, plus its serialized config."""
    import keras

    variables = {name: keras.Variable(value, name=name, dtype=value.dtype) for name, value in initial.items()}
    optimizer = _keras_optimizer(spec)
    config = keras.optimizers.serialize(optimizer)
    if spec["exclude"]:
        optimizer.exclude_from_weight_decay(var_names=spec["exclude"])
    optimizer.build(list(variables.values()))
    snapshots = [_keras_snapshot(optimizer, variables)]
    for grads in steps:
        values = [None if g is None else keras.ops.convert_to_tensor(g, dtype=g.dtype) for g in grads.values()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras warns about dropped gradients
            optimizer.apply(values, list(variables.values()))
        snapshots.append(_keras_snapshot(optimizer, variables))
    return config, snapshots


# ---------------------------------------------------------------- engine side
def engine_trajectory(config, spec, initial, steps):
    engine = optimizers.deserialize(json.loads(json.dumps(config)))
    assert engine.get_config() == config, "get_config() differs from Keras's serialize()"
    if spec["exclude"]:
        engine.exclude_from_weight_decay(spec["exclude"])
    engine.build(initial)

    def snapshot():
        return {
            "variables": engine.read_variables(),
            "slots": {f"{n}_{slot}": v for n, slots in engine.get_slots().items() for slot, v in slots.items()},
            "iterations": engine.iterations,
            "raw_iterations": engine.raw_iterations,
            "u_product": engine.get_scalars().get("u_product"),
            "learning_rate": engine.current_learning_rate(),
        }

    snapshots = [snapshot()]
    for grads in steps:
        engine.apply(grads)
        snapshots.append(snapshot())
    return snapshots


def _compare(actual, expected, what):
    expected = np.asarray(expected)
    actual = np.asarray(actual, dtype=expected.dtype) if np.ndim(actual) == 0 else actual
    rtol, atol = (FLOAT64_RTOL, FLOAT64_ATOL) if expected.dtype == np.float64 else (FLOAT32_RTOL, FLOAT32_ATOL)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != Keras {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != Keras {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=what)


def assert_same_trajectory(case, ours, theirs):
    for step, (mine, keras_state) in enumerate(zip(ours, theirs, strict=True)):
        what = f"{case!r} " + ("after build" if step == 0 else f"after step {step}")
        for name, expected in keras_state["variables"].items():
            _compare(mine["variables"][name], expected, f"{what}: variable {name!r}")
        assert sorted(mine["slots"]) == sorted(keras_state["slots"]), f"{what}: slot names"
        for key, expected in keras_state["slots"].items():
            _compare(mine["slots"][key], expected, f"{what}: slot {key!r}")
        assert mine["iterations"] == keras_state["iterations"], f"{what}: iterations"
        assert mine["raw_iterations"] == keras_state["raw_iterations"], f"{what}: raw iterations"
        assert mine["learning_rate"] == keras_state["learning_rate"], f"{what}: learning rate"
        if keras_state["u_product"] is not None:
            _compare(mine["u_product"], keras_state["u_product"], f"{what}: u_product")


@pytest.mark.parametrize("case", FLOAT32_CASES, ids=repr)
def test_float32_matches_keras_step_by_step(case):
    initial, steps = _inputs(case)
    spec = _spec(case)
    config, theirs = keras_trajectory(spec, initial, steps)
    assert_same_trajectory(case, engine_trajectory(config, spec, initial, steps), theirs)


# ------------------------------------------------------------ float64 oracle
@pytest.fixture
def keras_float64_arithmetic(monkeypatch):
    """Keras's NumPy backend with float64 arithmetic kept in float64.

    Keras's type promotion narrows every 64-bit result to 32 bits on all backends
    but TensorFlow (following JAX's default), so on the NumPy backend a float64
    variable is updated with float32 arithmetic. The engine updates float64
    variables in float64, as Keras does on TensorFlow; switching Keras's
    narrowing table to TensorFlow's entry gives exactly that oracle, running
    the very same optimizer code.
    """
    from keras.src.backend.common import dtypes

    monkeypatch.setitem(dtypes.BIT64_TO_BIT32_DTYPE, "float64", "float64")


@pytest.mark.parametrize("case", FLOAT64_CASES, ids=repr)
def test_float64_matches_keras_step_by_step(keras_float64_arithmetic, case):
    initial, steps = _inputs(case)
    spec = _spec(case)
    config, theirs = keras_trajectory(spec, initial, steps)
    assert_same_trajectory(case, engine_trajectory(config, spec, initial, steps), theirs)


BIT_EXACT_CASES = [
    Case("Adam", learning_rate=0.02, amsgrad=True, clipnorm=0.5),
    Case("Nadam", learning_rate=0.02, gradient_accumulation_steps=2, steps=6),
    Case("RMSprop", learning_rate=0.01, momentum=0.5, centered=True, use_ema=True, ema_overwrite_frequency=2),
    Case(
        "Ftrl",
        learning_rate=0.1,
        l1_regularization_strength=0.05,
        l2_shrinkage_regularization_strength=0.05,
        beta=0.2,
        global_clipnorm=1.0,
    ),
    Case("Adadelta", learning_rate=1.0, weight_decay=0.2, loss_scale_factor=16.0, grad_scale=16.0),
    Case("AdamW", learning_rate=0.02, weight_decay=0.3, amsgrad=True, clipnorm=0.5),
    Case("Lion", learning_rate=0.01, beta_1=0.5, weight_decay=0.2, use_ema=True),
    Case("Lamb", learning_rate=0.02, beta_1=0.5, global_clipnorm=1.0, gradient_accumulation_steps=2),
    Case("ScheduleFreeAdamW", learning_rate=0.02, warmup_steps=3, clipvalue=0.3),
    Case("Adafactor", learning_rate=0.05, use_ema=True, weight_decay=0.1),
    Case("Muon", learning_rate=0.02, global_clipnorm=1.0, gradient_accumulation_steps=2),
]
for _case in BIT_EXACT_CASES:
    _normalize(_case)


@pytest.mark.parametrize("case", BIT_EXACT_CASES, ids=repr)
def test_cpu_backend_is_bit_identical_to_keras(case):
    initial, steps = _inputs(case)
    spec = _spec(case)
    config, theirs = keras_trajectory(spec, initial, steps)
    ours = engine_trajectory(config, spec, initial, steps)
    for step, (mine, keras_state) in enumerate(zip(ours, theirs)):
        for kind in ("variables", "slots"):
            for key, expected in keras_state[kind].items():
                np.testing.assert_array_equal(mine[kind][key], expected, err_msg=f"{case!r} step {step} {key}")


def test_global_clipnorm_over_many_tensors_is_bit_identical_to_keras():
    # Keras adds the per-tensor sums with np.sum, whose pairwise order only
    # differs from a running sum from 8 tensors on.
    rng = np.random.default_rng(29)  # first step: the two orders give scales 1 ulp apart
    shapes = {f"w{i}": (i + 1, 3) for i in range(11)}
    initial = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    steps = [
        {name: (rng.normal(size=shape) * 10).astype(np.float32) for name, shape in shapes.items()} for _ in range(3)
    ]
    spec = {"class_name": "SGD", "kwargs": {"learning_rate": 0.1, "global_clipnorm": 1.0}, "exclude": None}
    config, theirs = keras_trajectory(spec, initial, steps)
    ours = engine_trajectory(config, spec, initial, steps)
    for mine, keras_state in zip(ours, theirs):
        for name, expected in keras_state["variables"].items():
            np.testing.assert_array_equal(mine["variables"][name], expected)


def _gpu_backend_or_skip():
    from optserve.server.backends import get_backend
    from optserve.server.errors import OptserveError

    try:
        return get_backend("gpu")
    except (OptserveError, ImportError) as error:
        pytest.skip(f"no CuPy/GPU backend here: {error}")


@pytest.mark.parametrize("case", BIT_EXACT_CASES, ids=repr)
def test_gpu_backend_matches_keras(case):
    backend = _gpu_backend_or_skip()
    initial, steps = _inputs(case)
    spec = _spec(case)
    config, theirs = keras_trajectory(spec, initial, steps)
    engine = optimizers.deserialize(config, backend=backend)
    if spec["exclude"]:
        engine.exclude_from_weight_decay(spec["exclude"])
    engine.build(initial)
    for step, grads in enumerate(steps, start=1):
        engine.apply(grads)
        for name, expected in theirs[step]["variables"].items():
            _compare(engine.read_variables([name])[name], expected, f"{case!r} on GPU, step {step}: {name}")
        slots = {f"{n}_{slot}": v for n, per in engine.get_slots().items() for slot, v in per.items()}
        for key, expected in theirs[step]["slots"].items():
            _compare(slots[key], expected, f"{case!r} on GPU, step {step}: slot {key}")


def test_parity_table_covers_every_optimizer_option_and_schedule():
    from optserve.server import schedules

    covered = {case.class_name.lower() for case in ALL_CASES} | WRAPPERS
    assert covered == set(optimizers.REGISTRY), f"optimizers without parity cases: {set(optimizers.REGISTRY) - covered}"
    common = {
        "clipnorm",
        "clipvalue",
        "global_clipnorm",
        "weight_decay",
        "use_ema",
        "ema_momentum",
        "ema_overwrite_frequency",
        "gradient_accumulation_steps",
        "loss_scale_factor",
    }
    for cls in optimizers.REGISTRY.values():
        if cls.class_name.lower() in WRAPPERS:
            continue
        cases = [c for c in FLOAT32_CASES if c.class_name == cls.class_name]
        used = set().union(*(c.kwargs for c in cases))
        own = {h.name for h in cls.hyperparameters}
        assert own <= used, f"{cls.class_name}: hyperparameters never varied: {own - used}"
        assert common <= used, f"{cls.class_name}: common options never used: {common - used}"
        assert any(c.drop for c in ALL_CASES), "no case drops gradients"
        assert any(c.class_name == cls.class_name for c in FLOAT64_CASES), f"{cls.class_name}: no float64 case"
    scheduled = [
        c.kwargs["learning_rate"].class_name for c in ALL_CASES if isinstance(c.kwargs.get("learning_rate"), Schedule)
    ]
    assert set(scheduled) == set(schedules.REGISTRY)
    assert min(scheduled.count(name) for name in schedules.REGISTRY) >= 3
