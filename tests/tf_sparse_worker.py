"""Keras with the TensorFlow backend applying tf.IndexedSlices gradients: the oracle for sparse pushes.

Run as a subprocess (TensorFlow is imported once, here): reads JSON from stdin
({"optimizer": config, "table": [[...]], "steps": [[indices, rows], ...]}) and
prints the table after Keras applied every step, and the optimizer's variables.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def main() -> None:
    job = json.loads(sys.stdin.read())
    table = keras.Variable(np.asarray(job["table"], np.float32), name="table")
    optimizer = keras.optimizers.deserialize(job["optimizer"])
    optimizer.build([table])
    for indices, rows in job["steps"]:
        gradient = tf.IndexedSlices(
            tf.constant(rows, tf.float32),
            tf.constant(indices, tf.int64),
            dense_shape=tf.constant(table.shape, tf.int64),
        )
        optimizer.apply_gradients([(gradient, table)])
    print(
        json.dumps(
            {"table": np.asarray(table).tolist(), "slots": [np.asarray(v).tolist() for v in optimizer.variables[2:]]}
        )
    )


if __name__ == "__main__":
    main()
