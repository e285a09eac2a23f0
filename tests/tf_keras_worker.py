"""One tf_keras (Keras 2) worker process for tests/test_tf_keras.py.

tf_keras is what `tf.keras` is under `TF_USE_LEGACY_KERAS=1`; TensorFlow is
imported once, here, and every check runs in this process:

    TF_USE_LEGACY_KERAS=1 python tests/tf_keras_worker.py --address 127.0.0.1:PORT --report out.json

Each check compares the remote optimizer with tf_keras's own optimizer of the
same class. The report is `{"checks": {name: "ok" | traceback}, "facts": {...}}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

keras = tf.keras
ATOL = RTOL = 1e-5

# Every optimizer class the server runs, with non-default arguments.
OPTIMIZERS = {
    "SGD": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "RMSprop": lambda: keras.optimizers.RMSprop(0.01, momentum=0.5, centered=True),
    "Adam": lambda: keras.optimizers.Adam(0.01, amsgrad=True),
    "Adagrad": lambda: keras.optimizers.Adagrad(0.1),
    "Adadelta": lambda: keras.optimizers.Adadelta(1.0),
    "Adamax": lambda: keras.optimizers.Adamax(0.01),
    "Nadam": lambda: keras.optimizers.Nadam(0.01),
    "Ftrl": lambda: keras.optimizers.Ftrl(0.1, l1_regularization_strength=0.01, l2_regularization_strength=0.01),
    "Adam+weight_decay+clipnorm": lambda: keras.optimizers.Adam(0.01, weight_decay=0.1, clipnorm=0.5),
}


def assert_close(actual, expected, what):
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected), f"{what}: {len(actual)} arrays, expected {len(expected)}"
    for index, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=RTOL, atol=ATOL, err_msg=f"{what}[{index}]")


def make_model(prefix):
    return keras.Sequential(
        [keras.layers.Dense(4, activation="softmax", input_shape=(10,), name=f"{prefix}_dense")], name=prefix
    )


def twins(prefix):
    model, local = make_model(f"{prefix}_remote"), make_model(f"{prefix}_local")
    local.set_weights(model.get_weights())
    return model, local


def data(seed, n=32):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 10)).astype("float32"), np.eye(4, dtype="float32")[rng.integers(0, 4, n)]


def state(optimizer):
    return [v.numpy() for v in optimizer.variables]


class Checks:
    def __init__(self, address):
        self.address = address
        self.facts = {}

    def remote(self, optimizer, name):
        from optserve.client.tf_keras_optimizer import RemoteOptimizer

        return RemoteOptimizer(optimizer, self.address, model_id=f"tf_keras-{name}-{os.getpid()}")

    def check_tf_keras_is_tf_keras(self):
        import tf_keras

        assert keras.optimizers.Adam is tf_keras.optimizers.Adam, f"tf.keras is {keras.__name__}"

    def check_compile_and_fit_match_local(self):
        x, y = data(1)
        model, local = twins("fit")
        opt, local_opt = self.remote(keras.optimizers.Adam(0.01), "fit"), keras.optimizers.Adam(0.01)
        model.compile(loss="categorical_crossentropy", optimizer=opt)
        local.compile(loss="categorical_crossentropy", optimizer=local_opt)
        history = model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
        local_history = local.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
        assert int(opt.iterations) == 8, int(opt.iterations)
        assert_close(model.get_weights(), local.get_weights(), "model weights")
        np.testing.assert_allclose(history.history["loss"], local_history.history["loss"], rtol=1e-5)
        assert_close(opt.get_weights(), state(local_opt), "get_weights()")
        assert_close([v.numpy() for v in opt.weights], state(local_opt), "weights")

    def check_gradient_tape_loops_match_local(self):
        """Eager, and inside `@tf.function`, with `apply_gradients(grads_and_vars)`."""
        x, y = data(2)
        loss_fn = keras.losses.CategoricalCrossentropy()
        for compiled in (False, True):
            model, local = twins(f"tape{int(compiled)}")
            opt = self.remote(keras.optimizers.RMSprop(0.01), f"tape{int(compiled)}")
            local_opt = keras.optimizers.RMSprop(0.01)

            def step(model, optimizer, batch_x, batch_y):
                with tf.GradientTape() as tape:
                    loss = loss_fn(batch_y, model(batch_x, training=True))
                grads = tape.gradient(loss, model.trainable_weights)
                optimizer.apply_gradients(zip(grads, model.trainable_weights))

            run = tf.function(step) if compiled else step
            run_local = tf.function(step) if compiled else step
            for i in range(0, len(x), 8):
                run(model, opt, tf.constant(x[i : i + 8]), tf.constant(y[i : i + 8]))
                run_local(local, local_opt, tf.constant(x[i : i + 8]), tf.constant(y[i : i + 8]))
            assert int(opt.iterations) == 4, int(opt.iterations)
            assert_close(model.get_weights(), local.get_weights(), f"weights (tf.function: {compiled})")
            assert_close(opt.get_weights(), state(local_opt), f"get_weights() (tf.function: {compiled})")

    def check_every_optimizer_class_matches_tf_keras(self):
        rng = np.random.default_rng(3)
        grads = [rng.normal(size=(3, 4)).astype("float32") for _ in range(6)]
        for name, make in OPTIMIZERS.items():
            variable = tf.Variable(np.ones((3, 4), "float32"), name="v")
            local_variable = tf.Variable(np.ones((3, 4), "float32"), name="v")
            opt, local_opt = self.remote(make(), name.replace("+", "-")), make()
            for gradient in grads:
                opt.apply_gradients([(tf.constant(gradient), variable)])
                local_opt.apply_gradients([(tf.constant(gradient), local_variable)])
            assert_close([variable.numpy()], [local_variable.numpy()], f"{name}: variable")
            assert_close(opt.get_weights(), state(local_opt), f"{name}: state")

    def check_get_and_set_weights_like_the_keras_2_docs(self):
        opt = self.remote(keras.optimizers.RMSprop(), "docs")
        model = keras.Sequential([keras.layers.Dense(10, input_shape=(20,), name="docs_dense")])
        model.compile(optimizer=opt, loss="mse")
        model.fit(np.arange(100, dtype="float32").reshape(5, 20), np.zeros((5, 10), "float32"), verbose=0)
        assert [np.shape(w) for w in opt.get_weights()] == [(), (20, 10), (10,)]
        opt.set_weights([np.array(10), np.ones([20, 10]), np.zeros([10])])
        assert int(opt.iterations) == 10, int(opt.iterations)
        np.testing.assert_array_equal(opt.get_weights()[1], np.ones([20, 10]))
        try:
            opt.set_weights([np.array(10), np.ones([3, 3]), np.zeros([10])])
        except ValueError:
            pass
        else:
            raise AssertionError("set_weights accepted a wrong shape")
        assert int(opt.get_weights()[0]) == 10

    def check_schedule_inside_fit_matches_local(self):
        def sgd():
            return keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5), momentum=0.9)

        x, y = data(4)
        model, local = twins("sched")
        opt, local_opt = self.remote(sgd(), "sched"), sgd()
        model.compile(loss="categorical_crossentropy", optimizer=opt)
        local.compile(loss="categorical_crossentropy", optimizer=local_opt)
        model.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0)
        local.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0)
        assert_close(model.get_weights(), local.get_weights(), "model weights")
        np.testing.assert_allclose(float(opt.learning_rate), float(local_opt.learning_rate), rtol=1e-6)

    def check_config_round_trip_and_save_load(self):
        from optserve.client.tf_keras_optimizer import RemoteOptimizer

        opt = self.remote(keras.optimizers.Adam(0.02), "saved")
        again = RemoteOptimizer.from_config(opt.get_config())
        assert again.get_config() == opt.get_config()
        from_plain_config = RemoteOptimizer(
            {"class_name": "Adam", **keras.optimizers.Adam(0.02).get_config()}, self.address, model_id=opt.model_id
        )
        assert from_plain_config._server_config_json == opt._server_config_json
        x, y = data(5)
        model = make_model("saved")
        model.compile(loss="categorical_crossentropy", optimizer=opt)
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        saved_state = opt.get_weights()
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.keras")
            model.save(path)
            opt.client.delete_model(opt.model_id)
            loaded = keras.models.load_model(path)
        assert isinstance(loaded.optimizer, RemoteOptimizer), type(loaded.optimizer)
        loaded.fit(x, y, epochs=1, batch_size=8, verbose=0)
        assert int(saved_state[0]) == 4
        assert int(loaded.optimizer.iterations) == 8, int(loaded.optimizer.iterations)

    def check_legacy_optimizers_are_refused_with_the_replacement(self):
        from optserve.client.tf_keras_optimizer import RemoteOptimizer

        try:
            RemoteOptimizer(keras.optimizers.legacy.Adam(), self.address)
        except ValueError as error:
            assert "tf.keras.optimizers.Adam" in str(error), str(error)
        else:
            raise AssertionError("a legacy optimizer was accepted")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--report", required=True)
    args = parser.parse_args(argv)
    checks = Checks(args.address)
    results = {}
    for name in [n for n in vars(Checks) if n.startswith("check_")]:
        try:
            getattr(checks, name)()
            results[name[len("check_") :]] = "ok"
        except Exception:  # noqa: BLE001 - every failure goes into the report
            results[name[len("check_") :]] = traceback.format_exc()
    with open(args.report, "w") as handle:
        json.dump({"checks": results, "facts": checks.facts}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
