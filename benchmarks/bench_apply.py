"""Apply throughput of optserve's engine against memory bandwidth and Keras/JAX.

For each optimizer on one float32 variable of each size (a vector; a matrix
of ``--matrix`` for Adafactor and Muon, whose math is about 2-D variables), this
times ``optserve.server.optimizers.deserialize(config)`` ->
``.build({"w": ...})`` -> ``.apply({"w": grad})`` on the CPU backend and prints:

* ``Melem/s``: parameters updated per second;
* ``GB/s``: bytes the update must move (every array the kernel reads once, every
  state it writes once; Adam: read grad, var, m, v and write var, m, v = 28 B;
  for a staged program (Lamb, Adafactor, Muon) every stage's arrays, matrix
  products counted as one read of each operand and one write), divided by the time;
* ``x copy``: that rate over the memory copy bandwidth measured in this same run
  (``np.copyto`` of a large float32 array, 8 B per element);
* ``x Keras/JAX``: Keras 3's own apply with the JAX backend, jit-compiled as its
  trainer runs it (``jax.jit(optimizer.stateless_apply)`` with the state
  donated), same config, same tensors, in a subprocess with
  ``KERAS_BACKEND=jax``; > 1 means optserve is faster.

Every time is the median of several repeats after warm-up.

    python benchmarks/bench_apply.py                 # 1M, 10M, 50M parameters
    python benchmarks/bench_apply.py --sizes 10M     # one size
    python benchmarks/bench_apply.py --quick         # a smoke run (seconds)
    python benchmarks/bench_apply.py --no-native     # the NumPy programs instead of compiled kernels
    python benchmarks/bench_apply.py --optimizers Adafactor,Muon --matrix 4096x4096
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

# The same Keras configs on both sides (keras.optimizers.serialize's form).
OPTIMIZERS = {
    "Adam": {"class_name": "Adam", "config": {"learning_rate": 0.001}},
    "RMSprop": {"class_name": "RMSprop", "config": {"learning_rate": 0.001}},
    "SGD(momentum=0.9)": {"class_name": "SGD", "config": {"learning_rate": 0.01, "momentum": 0.9}},
    "Ftrl": {
        "class_name": "Ftrl",
        "config": {"learning_rate": 0.001, "l1_regularization_strength": 0.001, "l2_regularization_strength": 0.001},
    },
    "AdamW": {"class_name": "AdamW", "config": {"learning_rate": 0.001}},
    "Lion": {"class_name": "Lion", "config": {"learning_rate": 0.0001}},
    "Lamb": {"class_name": "Lamb", "config": {"learning_rate": 0.001}},
    "ScheduleFreeAdamW": {"class_name": "ScheduleFreeAdamW", "config": {"learning_rate": 0.0025}},
    "LossScaleOptimizer(Adam)": {
        "class_name": "LossScaleOptimizer",
        "config": {
            "inner_optimizer": {
                "module": "keras.optimizers",
                "class_name": "Adam",
                "config": {"learning_rate": 0.001},
                "registered_name": None,
            }
        },
    },
    "Adafactor": {"class_name": "Adafactor", "config": {"learning_rate": 0.001}},
    "Muon": {"class_name": "Muon", "config": {"learning_rate": 0.001}},
}
# Optimizers timed on a matrix (--matrix) instead of the vector sizes.
MATRIX_OPTIMIZERS = ("Adafactor", "Muon")
DEFAULT_OPTIMIZERS = (
    "Adam",
    "RMSprop",
    "SGD(momentum=0.9)",
    "Ftrl",
    "AdamW",
    "Lion",
    "Lamb",
    "ScheduleFreeAdamW",
    "LossScaleOptimizer(Adam)",
    "Adafactor",
)
DEFAULT_SIZES = (1_000_000, 10_000_000, 50_000_000)
COPY_ELEMENTS = 64 * 1024 * 1024  # 256 MiB of float32: far beyond any cache


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    return int(float(number) * scale)


def format_size(size: int) -> str:
    for scale, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "K")):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{suffix}"
    return str(size)


def tensors(shape, seed: int = 0):
    """The variable and the gradient, identical in both processes."""
    rng = np.random.default_rng(seed)
    variable = rng.standard_normal(tuple(shape), dtype=np.float32)
    gradient = rng.standard_normal(tuple(shape), dtype=np.float32) * np.float32(0.01)
    return variable, gradient


def parse_matrix(text: str) -> tuple[int, int]:
    rows, _, columns = text.lower().partition("x")
    return int(rows), int(columns)


def repeats_for(size: int, quick: bool) -> int:
    if quick:
        return 3
    return 15 if size <= 2_000_000 else 9 if size <= 20_000_000 else 5


# ------------------------------------------------------------------ optserve


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


class CopyProbe:
    """np.copyto between two large float32 arrays: the machine's memory copy bandwidth."""

    def __init__(self, elements: int = COPY_ELEMENTS):
        self.source = np.ones(elements, np.float32)
        self.destination = np.zeros_like(self.source)  # touched, so no page faults while timed
        self.bytes = 8 * elements  # read + write

    def step(self) -> float:
        return timed(lambda: np.copyto(self.destination, self.source))


class OptserveProbe:
    """One engine optimizer on one variable: build once, time ``apply``."""

    def __init__(self, config: dict, shape, backend):
        from optserve.server import optimizers

        variable, gradient = tensors(shape)
        self.optimizer = optimizers.deserialize(config, backend=backend)
        self.optimizer.build({"w": variable})
        self.grads = {"w": gradient}
        self.bytes_per_parameter = bytes_per_parameter(self.optimizer, variable)

    def step(self) -> float:
        return timed(lambda: self.optimizer.apply(self.grads))


def bytes_per_parameter(optimizer, variable) -> float:
    """Each array an elementwise kernel touches is read once, each state it assigns written once;
    a staged program adds up its stages (reductions, axis means and matrix products read
    their operands once and write their result once)."""
    from optserve.server.programs import AxisMean, Broadcast, Elementwise, MatMul, Reduce, Transpose, UpdateProgram

    engine_variable = getattr(optimizer, "inner_optimizer", optimizer)._variables["w"]
    update = engine_variable.update
    if not isinstance(update, UpdateProgram):
        return (len(update.array_names) + len(update.assigned_state)) * variable.itemsize
    sizes = {"grad": variable.size, "var": variable.size}
    sizes.update({name: array.size for name, array in engine_variable.slots.items()})
    sizes.update({name: array.size for name, array in engine_variable.program_scratch.items()})
    elements = 0
    for stage in update.stages:
        if isinstance(stage, Elementwise):
            names = [stage.array(n) for n in stage.kernel.array_names]
            written = [stage.array(n) for n in stage.kernel.assigned_state]
            elements += sum(sizes[n] for n in names) + sum(sizes[n] for n in written)
        elif isinstance(stage, Reduce):
            elements += sizes[stage.array] * (3 if stage.scratch else 2)
        elif isinstance(stage, (AxisMean, Transpose)):
            elements += sizes[stage.array] + sizes[stage.into]
        elif isinstance(stage, (Broadcast, MatMul)):
            elements += sizes[stage.left] + sizes[stage.right] + sizes[stage.into]
    return elements * variable.itemsize / variable.size


# ------------------------------------------------------------------- Keras/JAX


class KerasWorker:
    """Keras 3 + JAX in a subprocess, driven one step at a time so that its
    timings interleave with optserve's and the copy probe's (the machine's
    speed drifts; interleaving makes the ratios fair)."""

    def __init__(self):
        environment = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--keras-worker"],
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def request(self, **message):
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        if not reply:
            raise RuntimeError("the Keras/JAX worker exited; see its error output above")
        return json.loads(reply)

    def setup(self, config: dict, shape) -> None:
        self.request(op="setup", config=config, shape=list(shape))

    def step(self) -> float:
        return self.request(op="step")["seconds"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


def keras_worker_loop() -> None:
    """The subprocess side (KERAS_BACKEND=jax): JSON requests in, JSON replies out."""
    import jax
    import keras

    state = {}

    def setup(config, shape):
        state.clear()
        variable, gradient = tensors(shape)
        optimizer = keras.optimizers.deserialize(config)
        if isinstance(optimizer, str):  # Keras 3.15's deserialize() misses Lamb; the class reads its config
            optimizer = getattr(keras.optimizers, config["class_name"]).from_config(config["config"])
        weight = keras.Variable(variable, name="w")
        optimizer.build([weight])
        # Keras's JAX trainer jits its step with the state donated; do the same.
        state["step"] = jax.jit(optimizer.stateless_apply, donate_argnums=(0, 2))
        state["optimizer"] = [v.value for v in optimizer.variables]
        state["trainable"] = [weight.value]
        state["grads"] = [jax.numpy.asarray(gradient)]
        for _ in range(2):  # compile and warm up
            apply()

    def apply():
        trainable, optimizer_variables = state["step"](state["optimizer"], state["grads"], state["trainable"])
        jax.block_until_ready(trainable)
        state["trainable"], state["optimizer"] = trainable, optimizer_variables

    for line in sys.stdin:
        message = json.loads(line)
        if message["op"] == "setup":
            setup(message["config"], message["shape"])
            reply = {"ok": True}
        else:
            reply = {"seconds": timed(apply)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def measure_row(config: dict, shape, repeats: int, backend, copy: CopyProbe, keras: KerasWorker | None) -> dict:
    """Median seconds of optserve, the copy probe and Keras/JAX, sampled in turn."""
    probe = OptserveProbe(config, shape, backend)
    if keras is not None:
        keras.setup(config, shape)
    for _ in range(2):  # warm up
        probe.step()
        copy.step()
    # A kernel new to this machine compiles on a background thread: time the compiled one.
    native = getattr(backend, "native", None)
    if native is not None:
        native.wait_idle()
        probe.step()
    samples = {"optserve": [], "copy": [], "keras": []}
    for _ in range(repeats):
        samples["copy"].append(copy.step())
        samples["optserve"].append(probe.step())
        if keras is not None:
            samples["keras"].append(keras.step())
    medians = {name: statistics.median(values) if values else None for name, values in samples.items()}
    medians["bytes_per_parameter"] = probe.bytes_per_parameter
    return medians


# ---------------------------------------------------------------------- report


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help="comma-separated parameter counts, e.g. 1M,10M,50M")
    parser.add_argument(
        "--optimizers",
        default=",".join(DEFAULT_OPTIMIZERS),
        help="comma-separated subset of: " + ", ".join(OPTIMIZERS) + " (default: all but Muon)",
    )
    parser.add_argument(
        "--matrix",
        default="4096x4096",
        help="the variable of "
        + ", ".join(MATRIX_OPTIMIZERS)
        + ", ROWSxCOLUMNS (default 4096x4096; --quick: 1024x1024)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1M parameters, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default by size)")
    parser.add_argument("--no-keras", action="store_true", help="skip the Keras/JAX baseline")
    parser.add_argument("--threads", type=int, default=None, help="NumPy backend threads (default: usable cores)")
    parser.add_argument("--working-set-kib", type=int, default=None, help="NumPy backend block working set, KiB")
    parser.add_argument(
        "--no-native", action="store_true", help="run the NumPy programs, not the kernels compiled for this CPU"
    )
    parser.add_argument("--keras-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.keras_worker:
        keras_worker_loop()
        return 0

    if args.sizes:
        sizes = [parse_size(part) for part in args.sizes.split(",") if part.strip()]
    else:
        sizes = [1_000_000] if args.quick else list(DEFAULT_SIZES)
    matrix = parse_matrix("1024x1024" if args.quick and "--matrix" not in " ".join(argv or sys.argv) else args.matrix)
    names = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    unknown = [name for name in names if name not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; choose from {list(OPTIMIZERS)}")

    from optserve.server.backends import DEFAULT_WORKING_SET_BYTES, NumpyBackend, get_backend

    if args.threads is None and args.working_set_kib is None and not args.no_native:
        backend = get_backend("cpu")  # what the server uses
    else:
        backend = NumpyBackend(
            threads=args.threads,
            working_set_bytes=DEFAULT_WORKING_SET_BYTES
            if args.working_set_kib is None
            else args.working_set_kib * 1024,
            native=not args.no_native,
        )
    print(
        f"# {cpu_name()}, {os.cpu_count()} cores; numpy {np.__version__}; "
        f"{backend!r}, {backend.working_set_bytes // 1024} KiB working set per block"
    )
    copy = CopyProbe()
    keras = None if args.no_keras else KerasWorker()
    rows = []
    try:
        vector_names = [name for name in names if name not in MATRIX_OPTIMIZERS]
        matrix_names = [name for name in names if name in MATRIX_OPTIMIZERS]
        runs = [((size,), name) for size in sizes for name in vector_names] + [(matrix, name) for name in matrix_names]
        for shape, name in runs:
            size = int(np.prod(shape))
            repeats = args.repeats or repeats_for(size, args.quick)
            row = measure_row(OPTIMIZERS[name], shape, repeats, backend, copy, keras)
            row.update(name=name, size=size, shape=shape)
            rows.append(row)
            print(format_row(row, copy.bytes), file=sys.stderr, flush=True)  # progress
    finally:
        if keras is not None:
            keras.close()
    print()
    print(TABLE_HEADER)
    for row in rows:
        print(format_row(row, copy.bytes))
    return 0


TABLE_HEADER = (
    "| optimizer | params | ms/step | Melem/s | GB/s | copy GB/s | x copy | Keras/JAX ms | x Keras/JAX |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def format_row(row: dict, copy_bytes: int) -> str:
    seconds = row["optserve"]
    rate = row["size"] / seconds
    moved = rate * row["bytes_per_parameter"]
    copy_rate = copy_bytes / row["copy"]
    keras_ms = f"{row['keras'] * 1e3:.2f}" if row["keras"] else "-"
    speedup = f"{row['keras'] / seconds:.2f}" if row["keras"] else "-"
    params = format_size(row["size"]) if len(row["shape"]) == 1 else "x".join(map(str, row["shape"]))
    return (
        f"| {row['name']} | {params} | {seconds * 1e3:.2f} | {rate / 1e6:.0f} | {moved / 1e9:.1f} "
        f"| {copy_rate / 1e9:.1f} | {moved / copy_rate:.2f} | {keras_ms} | {speedup} |"
    )


if __name__ == "__main__":
    sys.exit(main())
