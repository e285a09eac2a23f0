"""A Keras worker whose `model.fit` outlives a server restart, for tests/test_keras_restart.py.

    KERAS_BACKEND=torch python tests/keras_restart_worker.py --address HOST:PORT --model-id M \
        --num-workers 2 --worker-index 0 --steps 60 --report out.json

The model and the loss make every step's gradient the same known constant
(a linear layer without bias; the loss is the mean prediction), so the final
kernel tells exactly how many updates the server applied:
`kernel = 1 - learning_rate * iterations * mean(x)`. Each worker contributes
`1/num_workers` of it. A callback paces the steps so that the test can stop the
server mid-`fit`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np

LEARNING_RATE = 0.01
FEATURES = np.array([1.0, 2.0, 3.0, 4.0], dtype="float32")
BATCH = 4


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--worker-index", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--pause", type=float, default=0.05, help="seconds each step waits after its update")
    parser.add_argument("--report", required=True)
    args = parser.parse_args(argv)

    recorder = Recorder()
    logging.getLogger("optserve").addHandler(recorder)
    logging.getLogger("optserve").setLevel(logging.INFO)

    import keras
    from keras import ops

    from optserve.client import RemoteOptimizer

    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", name="restart_dense")],
        name="restart",
    )
    share = 1.0 / args.num_workers
    opt = RemoteOptimizer(
        keras.optimizers.SGD(LEARNING_RATE),
        args.address,
        model_id=args.model_id,
        num_workers=args.num_workers,
        worker_index=args.worker_index,
        sync_timeout_s=120,
        retry_window_s=120,
    )
    model.compile(loss=lambda y_true, y_pred: ops.mean(y_pred) * share, optimizer=opt)
    x = np.tile(FEATURES, (args.steps * BATCH, 1))
    y = np.zeros((args.steps * BATCH, 1), dtype="float32")
    pace = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: time.sleep(args.pause))
    started = time.monotonic()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[pace])
    report = {
        "kernel": np.asarray(model.get_weights()[0]).reshape(-1).tolist(),
        "iterations": int(opt.iterations),
        "server_iterations": int(opt.get_weights()[0]),
        "seconds": time.monotonic() - started,
        "log": recorder.messages,
    }
    with open(args.report, "w") as handle:
        json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
