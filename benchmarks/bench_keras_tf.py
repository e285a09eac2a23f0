"""A TensorFlow `model.fit` step through RemoteOptimizer, beside the same step with Keras's own Adam.

    python benchmarks/bench_keras_tf.py            # Dense(64) and a ~5M-parameter MLP
    python benchmarks/bench_keras_tf.py --quick    # fewer steps

Keras 3 on `KERAS_BACKEND=tensorflow`, default compile (the train step traced by
`tf.function`, no XLA on CPU). The server runs in its own process
(`python -m optserve.server serve`). Both models train on the same batches,
interleaved epoch by epoch (ABAB) so that both see the same machine; the time
per step is the median over epochs of (epoch time / steps). The ratio is
remote over local: what a Keras user pays for moving the optimizer to the
server (a round trip with every gradient up and every weight down).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_rpc import ServerProcess  # noqa: E402


def build_model(name, inputs, hidden, layers_count, outputs):
    import keras

    layers = [keras.Input((inputs,))]
    layers += [keras.layers.Dense(hidden, activation="relu", name=f"{name}_h{i}") for i in range(layers_count)]
    layers += [keras.layers.Dense(outputs, name=f"{name}_out")]
    return keras.Sequential(layers, name=name)


def time_per_step(model, x, y, batch_size):
    start = time.perf_counter()
    model.fit(x, y, epochs=1, batch_size=batch_size, shuffle=False, verbose=0)
    return (time.perf_counter() - start) / (len(x) // batch_size)


def measure(address, label, inputs, hidden, layers_count, outputs, batch_size, steps, epochs):
    import keras

    from optserve.client import RemoteOptimizer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size * steps, inputs)).astype("float32")
    y = rng.normal(size=(batch_size * steps, outputs)).astype("float32")
    remote = build_model(f"{label}_remote", inputs, hidden, layers_count, outputs)
    local = build_model(f"{label}_local", inputs, hidden, layers_count, outputs)
    local.set_weights(remote.get_weights())
    remote.compile(
        loss="mse",
        optimizer=RemoteOptimizer(keras.optimizers.Adam(1e-3), address, model_id=f"bench-{label}-{os.getpid()}"),
    )
    local.compile(loss="mse", optimizer=keras.optimizers.Adam(1e-3))
    for model in (remote, local):  # trace, build, create the job on the server
        time_per_step(model, x[: batch_size * 2], y[: batch_size * 2], batch_size)
    remote_times, local_times = [], []
    for _ in range(epochs):
        remote_times.append(time_per_step(remote, x, y, batch_size))
        local_times.append(time_per_step(local, x, y, batch_size))
    params = remote.count_params()
    remote_ms, local_ms = statistics.median(remote_times) * 1e3, statistics.median(local_times) * 1e3
    return params, remote_ms, local_ms


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    steps, epochs = (10, 3) if args.quick else (40, 7)
    cases = [
        # label, inputs, hidden, hidden layers, outputs, batch
        ("dense64", 10, 64, 1, 1, 32),
        ("mlp5m", 1024, 1792, 2, 10, 64),
    ]
    server = ServerProcess()
    try:
        print("| model | params | remote ms/step | local ms/step | remote/local |")
        print("|---|---:|---:|---:|---:|")
        for case in cases:
            params, remote_ms, local_ms = measure(server.address, *case, steps=steps, epochs=epochs)
            print(
                f"| {case[0]} | {params:,} | {remote_ms:.2f} | {local_ms:.2f} | {remote_ms / local_ms:.2f} |",
                flush=True,
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
