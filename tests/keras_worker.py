"""One Keras worker process for tests/test_keras_integration.py.

A process can only use one Keras backend, and importing Keras with torch or
JAX costs seconds, so each backend runs every check in one process:

    KERAS_BACKEND=torch python tests/keras_worker.py --address 127.0.0.1:PORT \
        --report out.json [--peer MODEL:WORKER_INDEX:NUM_WORKERS ...]

With ``--peer`` the process first trains, as one of NUM_WORKERS synchronous
workers, each named model shared with its peers (each on its own slice of the
batch), in the order given. Then it runs the single-worker checks. Every check's outcome goes
to the JSON report: ``{"checks": {name: "ok" | "skip: why" | traceback}, "facts": {...}}``.
A failed check does not stop the others.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import traceback

import numpy as np

ATOL = 1e-5  # float32 results of two implementations of the same math
RTOL = 1e-5
SEED = 1234


class SkipCheck(Exception):
    """A check that does not apply to this backend; the reason goes into the report."""


# --------------------------------------------------------------------------- backend-specific pieces


def backend_name():
    import keras

    return keras.backend.backend()


def gradients(model, loss_fn, x, y):
    """The gradients of ``loss_fn(y, model(x))`` with respect to ``model.trainable_weights``."""
    import keras

    if keras.backend.backend() == "torch":
        import torch

        for variable in model.trainable_weights:
            variable.value.grad = None
        loss = loss_fn(torch.as_tensor(y), model(torch.as_tensor(x)))
        loss.backward()
        return [variable.value.grad for variable in model.trainable_weights]

    if keras.backend.backend() == "jax":
        import jax

        def compute_loss(trainable_values, non_trainable_values, x, y):
            y_pred, non_trainable_values = model.stateless_call(trainable_values, non_trainable_values, x)
            return loss_fn(y, y_pred), non_trainable_values

        grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
        (_, _), grads = grad_fn(
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            x,
            y,
        )
        return grads

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(tf.convert_to_tensor(y), model(tf.convert_to_tensor(x)))
        return tape.gradient(loss, model.trainable_weights)

    raise RuntimeError(f"No gradient recipe for backend {keras.backend.backend()!r}")


# --------------------------------------------------------------------------- models and data


def make_model(prefix, units=8):
    """The issue's model, smaller, with explicit layer names (workers must agree on variable paths)."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input((10,)),
            layers.Dense(units, kernel_initializer="uniform", name=f"{prefix}_dense"),
            layers.Activation("softmax", name=f"{prefix}_softmax"),
        ],
        name=prefix,
    )


def twin(model, prefix):
    """A second model with the same architecture and weights."""
    other = make_model(prefix, units=model.layers[0].units)
    other.set_weights(model.get_weights())
    return other


def data(n=32, classes=8, seed=SEED):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 10)).astype("float32")
    y = np.eye(classes, dtype="float32")[rng.integers(0, classes, size=n)]
    return x, y


def assert_close(actual, expected, what):
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected), f"{what}: {len(actual)} arrays, expected {len(expected)}"
    for index, (a, e) in enumerate(zip(actual, expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"{what}[{index}]: shape {a.shape}, expected {e.shape}"
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL, err_msg=f"{what}[{index}]")


def keras_state(optimizer):
    """A local Keras optimizer's state in tf.keras's layout: [iterations, *slots]."""
    skip = {id(optimizer._learning_rate)}
    iterations = np.asarray(optimizer.iterations)
    slots = [np.asarray(v) for v in optimizer.variables if v is not optimizer._iterations and id(v) not in skip]
    return [iterations, *slots]


def keras_slots(optimizer, model_variables):
    """{(index of the model variable, slot name): value} of a local Keras optimizer."""
    # Keras names a slot "<variable path with _ for />_<slot>".
    prefixes = sorted(
        ((v.path.replace("/", "_") + "_", index) for index, v in enumerate(model_variables)),
        key=lambda item: -len(item[0]),
    )
    slots = {}
    for variable in optimizer.variables:
        for prefix, index in prefixes:
            if variable.name.startswith(prefix):
                slots[(index, variable.name[len(prefix) :])] = np.asarray(variable)
                break
    return slots


def remote_slots(optimizer, model_variables):
    """The same, read from the server."""
    index = {v.path: i for i, v in enumerate(model_variables)}
    slots = optimizer.client.get_weights(optimizer.model_id).slots
    return {(index[name], slot): value for name, per_var in slots.items() for slot, value in per_var.items()}


def assert_state_like_keras(remote_opt, remote_model, local_opt, local_model):
    """Iterations and every slot, matched by variable and slot name (the order may differ)."""
    assert int(remote_opt.iterations) == int(local_opt.iterations), (
        f"iterations {int(remote_opt.iterations)}, Keras has {int(local_opt.iterations)}"
    )
    remote = remote_slots(remote_opt, remote_model.trainable_weights)
    local = keras_slots(local_opt, local_model.trainable_weights)
    assert sorted(remote) == sorted(local), f"slots {sorted(remote)}, Keras has {sorted(local)}"
    keys = sorted(local)
    assert_close([remote[k] for k in keys], [local[k] for k in keys], f"slots {keys}")


def digest(arrays):
    hasher = hashlib.sha256()
    for array in arrays:
        hasher.update(np.ascontiguousarray(np.asarray(array, dtype=np.float32)).tobytes())
    return hasher.hexdigest()


# --------------------------------------------------------------------------- checks


class Checks:
    def __init__(self, address, backend):
        self.address = address
        self.backend = backend
        self.facts = {}

    def model_id(self, name):
        # The process id keeps a second run against the same server from joining the first's models.
        return f"{self.backend}-{name}-{os.getpid()}"

    # ------------------------------------------------------------------ the issue's programs

    def check_issue_fit_program(self):
        """Program 1 of the issue, and the same training with a local Keras Adam."""
        import keras

        from optserve.client import RemoteOptimizer

        x, y = data()
        model = make_model("fit_remote")
        local_model = twin(model, "fit_local")
        opt = RemoteOptimizer(keras.optimizers.Adam(learning_rate=0.01), self.address, model_id=self.model_id("fit"))
        local_opt = keras.optimizers.Adam(learning_rate=0.01)
        model.compile(loss="categorical_crossentropy", optimizer=opt)
        local_model.compile(loss="categorical_crossentropy", optimizer=local_opt)
        seen = []

        def on_train_batch_end(batch, logs):
            seen.append(int(model.optimizer.iterations))
            # A read mid-fit; the JAX trainer then writes its stale copy back at the epoch's end.
            np.asarray(model.optimizer.variables[-1])

        record = keras.callbacks.LambdaCallback(on_train_batch_end=on_train_batch_end)
        history = model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0, callbacks=[record])
        local_history = local_model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
        self.facts["fit_jit_compile"] = bool(model.jit_compile)

        assert seen == list(range(1, 9)), f"iterations seen by a callback after each batch: {seen}"
        assert int(opt.iterations) == 8, f"iterations {int(opt.iterations)}, expected 8"
        assert_close(model.get_weights(), local_model.get_weights(), "model weights")
        np.testing.assert_allclose(history.history["loss"], local_history.history["loss"], rtol=1e-5)
        _, server_values = opt.client.pull(opt.model_id)
        assert_close([server_values[v.path] for v in model.trainable_weights], model.get_weights(), "server values")
        assert_close(opt.get_weights(), keras_state(local_opt), "get_weights()")
        # `variables` read through to the server, also after the trainer wrote them back.
        assert_close([np.asarray(v) for v in opt.variables], list(local_opt.variables), "variables")
        np.testing.assert_allclose(float(opt.learning_rate), float(local_opt.learning_rate), rtol=1e-7)

    def check_fit_with_schedule_matches_local(self):
        """A learning-rate schedule, evaluated on the server, as Keras evaluates it."""
        import keras

        from optserve.client import RemoteOptimizer

        def schedule():
            return keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=3, decay_rate=0.5)

        x, y = data(seed=7)
        model = make_model("sched_remote")
        local_model = twin(model, "sched_local")
        opt = RemoteOptimizer(
            keras.optimizers.SGD(learning_rate=schedule(), momentum=0.9),
            self.address,
            model_id=self.model_id("schedule"),
        )
        local_opt = keras.optimizers.SGD(learning_rate=schedule(), momentum=0.9)
        # JAX and TensorFlow also run several steps per compiled call (PyTorch refuses
        # steps_per_execution > 1).
        steps_per_execution = 1 if self.backend == "torch" else 2
        model.compile(loss="categorical_crossentropy", optimizer=opt, steps_per_execution=steps_per_execution)
        local_model.compile(
            loss="categorical_crossentropy", optimizer=local_opt, steps_per_execution=steps_per_execution
        )
        model.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0)
        local_model.fit(x, y, epochs=1, batch_size=4, shuffle=False, verbose=0)

        assert_close(model.get_weights(), local_model.get_weights(), "model weights")
        np.testing.assert_allclose(float(opt.learning_rate), float(local_opt.learning_rate), rtol=1e-6)
        assert_close(opt.get_weights(), keras_state(local_opt), "get_weights()")

    def check_fit_eager_matches_local(self):
        """`run_eagerly=True` (the JAX trainer then calls stateless_apply without jit)."""
        import keras

        from optserve.client import RemoteOptimizer

        x, y = data(seed=11)
        model = make_model("eager_remote")
        local_model = twin(model, "eager_local")
        opt = RemoteOptimizer("rmsprop", self.address, model_id=self.model_id("eager"))
        local_opt = keras.optimizers.get("rmsprop")
        model.compile(loss="categorical_crossentropy", optimizer=opt, run_eagerly=True)
        local_model.compile(loss="categorical_crossentropy", optimizer=local_opt, run_eagerly=True)
        model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
        local_model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
        assert_close(model.get_weights(), local_model.get_weights(), "model weights")
        assert_close(opt.get_weights(), keras_state(local_opt), "get_weights()")

    def check_fit_with_ema_matches_local(self):
        """`use_ema`: the server keeps the averages; at the end of fit the variables take them."""
        import keras

        from optserve.client import RemoteOptimizer

        def adam():
            return keras.optimizers.Adam(learning_rate=0.05, use_ema=True, ema_momentum=0.8)

        x, y = data(seed=13)
        model = make_model("ema_remote")
        local_model = twin(model, "ema_local")
        opt = RemoteOptimizer(adam(), self.address, model_id=self.model_id("ema"))
        local_opt = adam()
        model.compile(loss="categorical_crossentropy", optimizer=opt)
        local_model.compile(loss="categorical_crossentropy", optimizer=local_opt)
        model.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
        local_model.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
        assert_close(model.get_weights(), local_model.get_weights(), "model weights (the averages)")
        _, server_values = opt.client.pull(opt.model_id)
        assert_close([server_values[v.path] for v in model.trainable_weights], model.get_weights(), "server values")
        assert_state_like_keras(opt, model, local_opt, local_model)

    def check_fit_with_constraint_matches_local(self):
        """Keras constrains a variable after each update; the server must continue from that value."""
        import keras
        from keras import layers

        from optserve.client import RemoteOptimizer

        def constrained(prefix):
            return keras.Sequential(
                [
                    keras.Input((10,)),
                    layers.Dense(8, kernel_constraint=keras.constraints.NonNeg(), name=f"{prefix}_dense"),
                    layers.Activation("softmax", name=f"{prefix}_softmax"),
                ],
                name=prefix,
            )

        x, y = data(seed=17)
        model = constrained("nonneg_remote")
        local_model = constrained("nonneg_local")
        local_model.set_weights(model.get_weights())
        opt = RemoteOptimizer(
            keras.optimizers.SGD(learning_rate=0.5), self.address, model_id=self.model_id("constraint")
        )
        local_opt = keras.optimizers.SGD(learning_rate=0.5)
        model.compile(loss="categorical_crossentropy", optimizer=opt)
        local_model.compile(loss="categorical_crossentropy", optimizer=local_opt)
        model.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
        local_model.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
        assert_close(model.get_weights(), local_model.get_weights(), "model weights")
        _, server_values = opt.client.pull(opt.model_id)
        assert_close([server_values[v.path] for v in model.trainable_weights], model.get_weights(), "server values")

    def check_issue_custom_loop(self):
        """Program 2 of the issue: a custom loop with the backend's gradients."""
        import keras

        from optserve.client import RemoteOptimizer

        x, y = data(seed=3)
        model = make_model("loop_remote")
        local_model = twin(model, "loop_local")
        loss_fn = keras.losses.CategoricalCrossentropy()
        optimizer = RemoteOptimizer("adam", self.address, model_id=self.model_id("loop"))
        local_optimizer = keras.optimizers.Adam()
        dataset = [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)]
        for batch_x, batch_y in dataset:
            grads = gradients(model, loss_fn, batch_x, batch_y)
            optimizer.apply_gradients(zip(grads, model.trainable_weights))
            local_grads = gradients(local_model, loss_fn, batch_x, batch_y)
            local_optimizer.apply_gradients(zip(local_grads, local_model.trainable_weights))

        assert int(optimizer.iterations) == len(dataset)
        assert_close(model.get_weights(), local_model.get_weights(), "model weights")
        assert_close(optimizer.get_weights(), keras_state(local_optimizer), "get_weights()")

    # ------------------------------------------------------------------ optimizer state

    def check_set_weights_then_training_continues_like_keras(self):
        """Local Keras trains k steps; a fresh RemoteOptimizer takes its state; both go on alike."""
        import keras

        from optserve.client import RemoteOptimizer

        x, y = data(seed=5)
        loss_fn = keras.losses.CategoricalCrossentropy()
        local_model = make_model("resume_local")
        local_opt = keras.optimizers.Adam(learning_rate=0.05)
        batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)]
        for batch_x, batch_y in batches[:2]:
            local_opt.apply(gradients(local_model, loss_fn, batch_x, batch_y), local_model.trainable_weights)

        model = twin(local_model, "resume_remote")
        opt = RemoteOptimizer(keras.optimizers.Adam(learning_rate=0.05), self.address, model_id=self.model_id("resume"))
        opt.build(model.trainable_weights)
        opt.set_weights(keras_state(local_opt))
        assert int(opt.iterations) == 2
        assert_close(opt.get_weights(), keras_state(local_opt), "state after set_weights")

        for batch_x, batch_y in batches[2:]:
            local_opt.apply(gradients(local_model, loss_fn, batch_x, batch_y), local_model.trainable_weights)
            opt.apply(gradients(model, loss_fn, batch_x, batch_y), model.trainable_weights)
        assert_close(model.get_weights(), local_model.get_weights(), "model weights")
        assert_close(opt.get_weights(), keras_state(local_opt), "get_weights()")

    def check_set_weights_rejects_bad_lists(self):
        import keras

        from optserve.client import RemoteOptimizer

        model = make_model("reject")
        opt = RemoteOptimizer(keras.optimizers.SGD(momentum=0.5), self.address, model_id=self.model_id("reject"))
        opt.build(model.trainable_weights)
        before = opt.get_weights()
        bad_lists = {
            "count": before[:-1],
            "shape": [before[0], np.ones((3, 3), "float32"), *before[2:]],
        }
        for what, weights in bad_lists.items():
            try:
                opt.set_weights(weights)
            except ValueError as error:
                assert ("weights" in str(error)) or ("expects" in str(error)), str(error)
            else:
                raise AssertionError(f"set_weights accepted a list with a wrong {what}")
            assert_close(opt.get_weights(), before, f"state after the rejected {what}")

    def check_save_and_load_model_restores_server_state(self):
        """model.save() stores the server's optimizer state; load_model() writes it back."""
        import tempfile

        import keras

        from optserve.client import RemoteOptimizer

        x, y = data(seed=19)
        model = make_model("saved")
        opt = RemoteOptimizer(keras.optimizers.Adam(learning_rate=0.01), self.address, model_id=self.model_id("saved"))
        model.compile(loss="categorical_crossentropy", optimizer=opt)
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        saved_state = opt.get_weights()
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.keras")
            model.save(path)
            # A restarted server has lost the model. (A reloaded Sequential model's variable
            # paths lack the model's name, so it could not join the old model anyway.)
            opt.client.delete_model(opt.model_id)
            loaded = keras.models.load_model(path)
        assert isinstance(loaded.optimizer, RemoteOptimizer)
        assert_close(loaded.optimizer.get_weights(), saved_state, "state after load_model")
        loaded.fit(x, y, epochs=1, batch_size=8, verbose=0)
        assert int(loaded.optimizer.iterations) == 8

    def check_apply_inside_jit_is_refused_clearly(self):
        """apply() assigns variables, so it cannot be traced; the message says what to do instead."""
        if self.backend != "jax":
            raise SkipCheck("only JAX traces Python functions into compiled ones")
        import jax
        import keras

        from optserve.client import RemoteOptimizer

        variable = keras.Variable(np.zeros(3, "float32"), name="traced")
        opt = RemoteOptimizer("sgd", self.address, model_id=self.model_id("traced"))
        opt.build([variable])
        try:
            jax.jit(lambda g: opt.apply([g], [variable]))(np.ones(3, "float32"))
        except ValueError as error:
            assert "stateless_apply" in str(error), str(error)
        else:
            raise AssertionError("apply() ran inside jax.jit")
        assert int(opt.iterations) == 0

    def check_serialization_round_trip(self):
        import keras

        from optserve.client import RemoteOptimizer

        schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=10000, decay_rate=0.9)
        opt = RemoteOptimizer(
            keras.optimizers.Adam(learning_rate=schedule),
            self.address,
            model_id="never-built",
            num_workers=2,
            worker_index=1,
        )
        again = RemoteOptimizer.from_config(opt.get_config())
        assert again.get_config() == opt.get_config()
        revived = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
        assert isinstance(revived, RemoteOptimizer)
        assert revived.get_config() == opt.get_config()
        assert opt.get_config()["optimizer"]["module"] == "keras.optimizers"

    # ------------------------------------------------------------------ one source of truth

    def check_model_set_weights_and_load_weights_reach_the_server(self):
        """Writes to the model between fits are on the server before the next step, as with local Keras."""
        import tempfile

        import keras

        from optserve.client import RemoteOptimizer

        x, y = data(seed=41)
        model = make_model("writes_remote")
        local = twin(model, "writes_local")
        opt = RemoteOptimizer(keras.optimizers.Adam(0.05), self.address, model_id=self.model_id("writes"))
        local_opt = keras.optimizers.Adam(0.05)
        model.compile(loss="categorical_crossentropy", optimizer=opt)
        local.compile(loss="categorical_crossentropy", optimizer=local_opt)
        start = model.get_weights()
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "start.weights.h5")
            model.save_weights(path)
            for m in (model, local):
                m.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
            for m in (model, local):
                m.set_weights([w * 0.5 for w in start])
                m.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
            assert_close(model.get_weights(), local.get_weights(), "weights after set_weights + fit")
            for m in (model, local):
                m.load_weights(path)
                m.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
        assert_close(model.get_weights(), local.get_weights(), "weights after load_weights + fit")
        _, server_values = opt.client.pull(opt.model_id)
        assert_close([server_values[v.path] for v in model.trainable_weights], model.get_weights(), "server")
        assert_close(opt.get_weights(), keras_state(local_opt), "get_weights()")

    def check_restore_best_weights_reaches_the_server(self):
        import keras

        from optserve.client import RemoteOptimizer

        x, y = data(seed=43)
        vx, vy = data(seed=44, n=16)
        model = make_model("best_remote")
        local = twin(model, "best_local")
        # A learning rate large enough for the validation loss to go up again.
        opt = RemoteOptimizer(keras.optimizers.SGD(2.0), self.address, model_id=self.model_id("best"))
        local_opt = keras.optimizers.SGD(2.0)
        for m, o in ((model, opt), (local, local_opt)):
            m.compile(loss="categorical_crossentropy", optimizer=o)
            stop = keras.callbacks.EarlyStopping(patience=1, restore_best_weights=True)
            m.fit(x, y, validation_data=(vx, vy), epochs=6, batch_size=8, shuffle=False, verbose=0, callbacks=[stop])
            m.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
        assert_close(model.get_weights(), local.get_weights(), "weights")

    def check_save_server_loses_job_load_model_fit_equals_uninterrupted(self):
        """model.save, the server loses the job (restart without checkpoint), load_model, fit."""
        import tempfile

        import keras

        from optserve.client import RemoteOptimizer

        x, y = data(seed=47)
        # Auto-named layers: a reloaded Sequential's variable paths differ from the saved one's.
        model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(8, activation="softmax")])
        local = keras.Sequential([keras.Input((10,)), keras.layers.Dense(8, activation="softmax")])
        local.set_weights(model.get_weights())
        opt = RemoteOptimizer(keras.optimizers.Adam(0.02), self.address, model_id=self.model_id("reload"))
        local_opt = keras.optimizers.Adam(0.02)
        model.compile(loss="categorical_crossentropy", optimizer=opt)
        local.compile(loss="categorical_crossentropy", optimizer=local_opt)
        for m in (model, local):
            m.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "m.keras")
            model.save(path)
            # The server still holds the job: the loaded model joins it by position and continues.
            joined = keras.models.load_model(path)
            joined.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
            opt.client.delete_model(opt.model_id)  # now the server has lost it
            loaded = keras.models.load_model(path)
        local.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
        assert_close(joined.get_weights(), local.get_weights(), "load_model while the server holds the job")
        loaded.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
        assert int(loaded.optimizer.iterations) == 8, int(loaded.optimizer.iterations)
        assert_close(loaded.get_weights(), local.get_weights(), "load_model after the server lost the job")
        assert_close(loaded.optimizer.get_weights(), keras_state(local_opt), "optimizer state")

    def check_auto_named_reruns_join_one_job(self):
        """A notebook cell run twice: the same model, other auto names, one job."""
        import keras

        from optserve.client import RemoteOptimizer

        def cell():
            return keras.Sequential([keras.Input((10,)), keras.layers.Dense(8), keras.layers.Dense(3)])

        x, y = data(seed=53, classes=3)
        first = cell()
        model_id = self.model_id("rerun")
        opt = RemoteOptimizer("sgd", self.address, model_id=model_id)
        first.compile(loss="mse", optimizer=opt)
        first.fit(x, y, epochs=1, batch_size=8, verbose=0)
        cell()  # a scratch model built in between takes the next auto names
        second = cell()
        assert [v.path for v in second.trainable_weights] != [v.path for v in first.trainable_weights]
        again = RemoteOptimizer("sgd", self.address, model_id=model_id)
        second.compile(loss="mse", optimizer=again)
        again.build(second.trainable_weights)
        assert_close(second.get_weights(), first.get_weights(), "the joined model adopts the job's values")
        assert int(again.iterations) == 4
        second.fit(x, y, epochs=1, batch_size=8, verbose=0)
        assert int(again.iterations) == 8

        different = keras.Sequential([keras.Input((10,)), keras.layers.Dense(5), keras.layers.Dense(3)])
        try:
            RemoteOptimizer("sgd", self.address, model_id=model_id).build(different.trainable_weights)
        except ValueError as error:
            assert "variable 0" in str(error) and model_id in str(error), str(error)
        else:
            raise AssertionError("a different model joined the job")

    def check_default_job_is_fresh_and_resume_is_explicit(self):
        from optserve.client import RemoteOptimizer

        x, y = data(seed=59)
        ids = []
        for prefix in ("fresh_a", "fresh_b"):
            model = make_model(prefix)
            opt = RemoteOptimizer("adam", self.address)
            model.compile(loss="categorical_crossentropy", optimizer=opt)
            model.fit(x, y, epochs=1, batch_size=8, verbose=0)
            assert int(opt.iterations) == 4, int(opt.iterations)
            ids.append(opt.model_id)
        assert ids[0] != ids[1] and ids[0].startswith("adam"), ids
        strict = RemoteOptimizer("adam", self.address, model_id=ids[0], resume=False)
        try:
            strict.build(make_model("fresh_a").trainable_weights)
        except ValueError as error:
            assert "resume" in str(error) and "iterations" in str(error), str(error)
        else:
            raise AssertionError("resume=False joined a trained job")
        try:
            RemoteOptimizer("adam", self.address, model_id=self.model_id("absent"), resume=True).build(
                make_model("absent").trainable_weights
            )
        except ValueError as error:
            assert "resume=True" in str(error), str(error)
        else:
            raise AssertionError("resume=True created a job")
        try:
            RemoteOptimizer("adam", self.address, num_workers=2)
        except ValueError as error:
            assert "model_id" in str(error), str(error)
        else:
            raise AssertionError("several workers without a model_id")

    def check_learning_rate_callbacks_match_local(self):
        """LearningRateScheduler and ReduceLROnPlateau set the rate on the server, with Keras's numbers."""
        import keras

        from optserve.client import RemoteOptimizer

        x, y = data(seed=67)
        for kind in ("scheduler", "plateau"):

            def callbacks(kind=kind):
                if kind == "scheduler":
                    return [keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.5 if epoch else lr)]
                # min_delta so large that every epoch counts as no improvement: the rate drops each epoch.
                return [keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=10.0)]

            model = make_model(f"lr_{kind}_remote")
            local = twin(model, f"lr_{kind}_local")
            opt = RemoteOptimizer(keras.optimizers.Adam(0.05), self.address, model_id=self.model_id(f"lr_{kind}"))
            local_opt = keras.optimizers.Adam(0.05)
            model.compile(loss="categorical_crossentropy", optimizer=opt)
            local.compile(loss="categorical_crossentropy", optimizer=local_opt)
            model.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0, callbacks=callbacks())
            local.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0, callbacks=callbacks())
            np.testing.assert_allclose(float(opt.learning_rate), float(local_opt.learning_rate), rtol=1e-6)
            assert opt.client.list_models(opt.model_id)[0].learning_rate == float(opt.learning_rate)
            assert float(opt.learning_rate) < 0.05
            assert_close(model.get_weights(), local.get_weights(), f"{kind}: model weights")
            assert_close(opt.get_weights(), keras_state(local_opt), f"{kind}: get_weights()")

    def check_a_steady_fit_costs_one_round_trip_per_step(self):
        """Write-back detection, restart handling and state mirrors add no call to a steady step."""
        import keras

        from optserve.client import RemoteOptimizer

        x, y = data(seed=73)
        model = make_model("calls")
        opt = RemoteOptimizer(keras.optimizers.Adam(0.01), self.address, model_id=self.model_id("calls"))
        model.compile(loss="categorical_crossentropy", optimizer=opt)
        model.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)  # builds: creates the job
        calls = {}
        for method in ("push", "push_pull", "pull", "get_weights", "set_weights", "list_models", "create_model"):
            original = getattr(opt.client, method)

            def counted(*args, _original=original, _method=method, **kwargs):
                calls[_method] = calls.get(_method, 0) + 1
                return _original(*args, **kwargs)

            setattr(opt.client, method, counted)
        epochs = 2
        model.fit(x, y, epochs=epochs, batch_size=8, shuffle=False, verbose=0)
        assert calls.pop("push_pull", 0) == 4 * epochs, calls
        # JAX's trainer reads the optimizer's variables once an epoch (its state sync): the
        # slots are fetched then, never per step. The other trainers read none.
        allowed = {"get_weights": epochs} if self.backend == "jax" else {}
        assert all(calls.get(m, 0) <= n for m, n in allowed.items()) and set(calls) <= set(allowed), calls

    def check_iterations_read_right_after_set_weights_and_fit(self):
        import keras

        from optserve.client import RemoteOptimizer

        x, y = data(seed=61)
        model = make_model("stale")
        opt = RemoteOptimizer(keras.optimizers.SGD(momentum=0.5), self.address, model_id=self.model_id("stale"))
        model.compile(loss="categorical_crossentropy", optimizer=opt)
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        assert "value=4" in repr(opt.iterations), repr(opt.iterations)
        weights = opt.get_weights()
        opt.set_weights([np.array(10), *weights[1:]])
        assert "value=10" in repr(opt.iterations), repr(opt.iterations)
        assert int(opt.iterations) == 10

    # ------------------------------------------------------------------ TensorFlow

    def require_tensorflow(self):
        if self.backend != "tensorflow":
            raise SkipCheck("a TensorFlow program")

    def check_tf_function_custom_loop_matches_local(self):
        """A `tf.GradientTape` step inside `@tf.function`: traced once, one round trip per step."""
        self.require_tensorflow()
        import keras
        import tensorflow as tf

        from optserve.client import RemoteOptimizer

        x, y = data(seed=23)
        loss_fn = keras.losses.CategoricalCrossentropy()

        def make_step(model, optimizer, traces):
            @tf.function
            def train_step(batch_x, batch_y):
                traces.append(1)
                with tf.GradientTape() as tape:
                    loss = loss_fn(batch_y, model(batch_x, training=True))
                grads = tape.gradient(loss, model.trainable_weights)
                optimizer.apply_gradients(zip(grads, model.trainable_weights))
                return loss

            return train_step

        model = make_model("tff_remote")
        local_model = twin(model, "tff_local")
        # Not built before the first traced step: building inside the trace must work.
        optimizer = RemoteOptimizer(keras.optimizers.Adam(0.02), self.address, model_id=self.model_id("tff"))
        local_optimizer = keras.optimizers.Adam(0.02)
        traces, local_traces = [], []
        step, local_step = make_step(model, optimizer, traces), make_step(local_model, local_optimizer, local_traces)
        batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(x), 8)] * 2
        for batch_x, batch_y in batches:
            step(tf.constant(batch_x), tf.constant(batch_y))
            local_step(tf.constant(batch_x), tf.constant(batch_y))
        # tf.function traces a step that creates variables (the optimizer's) twice, then never again.
        assert len(traces) == len(local_traces) <= 2, f"traced {len(traces)} times, Keras {len(local_traces)}"
        assert int(optimizer.iterations) == len(batches), int(optimizer.iterations)
        assert_close(model.get_weights(), local_model.get_weights(), "model weights")
        assert_close(optimizer.get_weights(), keras_state(local_optimizer), "get_weights()")
        _, server_values = optimizer.client.pull(optimizer.model_id)
        assert_close([server_values[v.path] for v in model.trainable_weights], model.get_weights(), "server values")

    def check_tf_data_and_callbacks_during_fit(self):
        """`tf.data` input; callbacks read iterations and the learning rate after every batch."""
        self.require_tensorflow()
        import keras
        import tensorflow as tf

        from optserve.client import RemoteOptimizer

        def sgd():
            schedule = keras.optimizers.schedules.InverseTimeDecay(0.1, decay_steps=1, decay_rate=0.5)
            return keras.optimizers.SGD(learning_rate=schedule, momentum=0.5)

        x, y = data(seed=29)
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        model = make_model("tfdata_remote")
        local_model = twin(model, "tfdata_local")
        opt = RemoteOptimizer(sgd(), self.address, model_id=self.model_id("tfdata"))
        local_opt = sgd()
        model.compile(loss="categorical_crossentropy", optimizer=opt)
        local_model.compile(loss="categorical_crossentropy", optimizer=local_opt)

        def recorder(optimizer, seen):
            def on_train_batch_end(batch, logs):
                seen.append((int(optimizer.iterations), float(optimizer.learning_rate)))

            return keras.callbacks.LambdaCallback(on_train_batch_end=on_train_batch_end)

        seen, local_seen = [], []
        model.fit(dataset, epochs=2, verbose=0, callbacks=[recorder(opt, seen)])
        local_model.fit(dataset, epochs=2, verbose=0, callbacks=[recorder(local_opt, local_seen)])
        assert [s[0] for s in seen] == list(range(1, 9)), seen
        np.testing.assert_allclose(seen, local_seen, rtol=1e-6)
        assert_close(model.get_weights(), local_model.get_weights(), "model weights")
        assert_close(opt.get_weights(), keras_state(local_opt), "get_weights()")

    def check_tf_embedding_gradients_go_sparse_and_match_local(self):
        """An Embedding's tf.IndexedSlices go on the wire as rows + indices; the numbers are Keras's."""
        self.require_tensorflow()
        import keras
        import tensorflow as tf

        from optserve.client import RemoteOptimizer, SparseGradient

        def embedding_model(prefix):
            return keras.Sequential(
                [
                    keras.Input((3,), dtype="int32"),
                    keras.layers.Embedding(50, 4, name=f"{prefix}_embedding"),
                    keras.layers.Flatten(name=f"{prefix}_flatten"),
                    keras.layers.Dense(2, name=f"{prefix}_dense"),
                ],
                name=prefix,
            )

        rng = np.random.default_rng(71)
        # Distinct ids within each batch of 8: with a repeated id, Keras's TensorFlow backend
        # applies some update ops to each repeated row before summing them (Adam's second
        # moment gets g1² + g2²), which neither its other backends nor the server do.
        x = np.concatenate([rng.permutation(50)[:24].reshape(8, 3) for _ in range(4)]).astype("int32")
        y = rng.normal(size=(32, 2)).astype("float32")
        for eager in (False, True):
            model = embedding_model(f"emb{int(eager)}_remote")
            local = embedding_model(f"emb{int(eager)}_local")
            local.set_weights(model.get_weights())
            opt = RemoteOptimizer(keras.optimizers.Adam(0.05), self.address, model_id=self.model_id(f"emb{int(eager)}"))
            local_opt = keras.optimizers.Adam(0.05)
            pushed = []
            push_pull = opt.client.push_pull

            def spy(model_id, grads, _pushed=pushed, _push_pull=push_pull, **kwargs):
                _pushed.append({name: type(g).__name__ for name, g in grads.items()})
                return _push_pull(model_id, grads, **kwargs)

            opt.client.push_pull = spy
            model.compile(loss="mse", optimizer=opt, run_eagerly=eager)
            local.compile(loss="mse", optimizer=local_opt, run_eagerly=eager)
            model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
            local.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
            embedding_name = model.layers[0].embeddings.path
            assert len(pushed) == 8 and all(p[embedding_name] == SparseGradient.__name__ for p in pushed), pushed
            assert all(kind == "ndarray" for p in pushed for name, kind in p.items() if name != embedding_name)
            assert_close(model.get_weights(), local.get_weights(), f"weights (run_eagerly={eager})")
            assert_close(opt.get_weights(), keras_state(local_opt), f"get_weights() (run_eagerly={eager})")
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y[:8], model(x[:8]))
        gradient = tape.gradient(loss, model.layers[0].embeddings.value)
        assert isinstance(gradient, tf.IndexedSlices), type(gradient)

    def check_tf_rmsprop_get_and_set_weights(self):
        """The tf.keras docs' example: RMSprop state after fit, then set_weights and iterations."""
        self.require_tensorflow()
        import keras

        from optserve.client import RemoteOptimizer

        opt = RemoteOptimizer(keras.optimizers.RMSprop(), self.address, model_id=self.model_id("rms_docs"))
        model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(10, name="rms_docs_dense")])
        model.compile(optimizer=opt, loss="mse")
        data_x = np.arange(100, dtype="float32").reshape(5, 20)
        labels = np.zeros((5, 10), dtype="float32")
        model.fit(data_x, labels, verbose=0)
        weights = opt.get_weights()
        assert [np.shape(w) for w in weights] == [(), (20, 10), (10,)], [np.shape(w) for w in weights]
        assert int(weights[0]) == 1
        opt.set_weights([np.array(10), np.ones([20, 10]), np.zeros([10])])
        assert int(opt.iterations) == 10, int(opt.iterations)
        after = opt.get_weights()
        assert int(after[0]) == 10
        np.testing.assert_array_equal(after[1], np.ones([20, 10]))
        np.testing.assert_array_equal(after[2], np.zeros([10]))

    def check_tf_jit_compile_is_refused_clearly(self):
        """XLA cannot compile the host call: the error says what to set, and nothing is applied."""
        self.require_tensorflow()
        from optserve.client import RemoteOptimizer

        x, y = data(seed=31)
        model = make_model("xla_remote")
        opt = RemoteOptimizer("sgd", self.address, model_id=self.model_id("xla"))
        model.compile(loss="categorical_crossentropy", optimizer=opt, jit_compile=True)
        try:
            model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        except ValueError as error:
            assert "jit_compile=False" in str(error), str(error)
        else:
            raise AssertionError("fit with jit_compile=True ran")
        assert int(opt.iterations) == 0

    def check_tf_errors_inside_fit_are_clear(self):
        """A deleted model and a server that is gone, met inside the traced train step."""
        self.require_tensorflow()
        import tensorflow as tf

        from optserve.client import RemoteOptimizer
        from optserve.server.app import start_server

        x, y = data(seed=37)
        model = make_model("gone_remote")
        opt = RemoteOptimizer("adam", self.address, model_id=self.model_id("deleted"))
        model.compile(loss="categorical_crossentropy", optimizer=opt)
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        opt.client.delete_model(opt.model_id)
        try:
            model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        except tf.errors.OpError as error:
            # Keras's nested train functions may report the host call's error as UnknownError;
            # the optserve exception's name and message are in the text either way.
            assert f"optserve.client.NotFoundError: No model {opt.model_id!r}" in str(error), str(error)
        else:
            raise AssertionError("fit went on after its model was deleted")

        server = start_server(host="127.0.0.1", port=0, device="cpu")
        model = make_model("gone_server")
        opt = RemoteOptimizer("adam", server.address, model_id=self.model_id("gone"), timeout=3, retry_window_s=1)
        model.compile(loss="categorical_crossentropy", optimizer=opt)
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        server.stop()
        try:
            model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        except tf.errors.OpError as error:
            assert "optserve.client.UnavailableError" in str(error), str(error)
        else:
            raise AssertionError("fit went on after the server stopped")

    # ------------------------------------------------------------------ several workers

    def run_two_workers(self, model_id, worker_index, num_workers, steps=3):
        """Each worker pushes the gradient of its half of the batch, loss scaled so the sum is the full one."""
        import keras

        from optserve.client import RemoteOptimizer

        x, y = data(n=16, seed=21)
        half = len(x) // num_workers
        my_x = x[worker_index * half : (worker_index + 1) * half]
        my_y = y[worker_index * half : (worker_index + 1) * half]
        full_loss = keras.losses.CategoricalCrossentropy()

        def my_loss(y_true, y_pred):
            # mean over my half * (my share of the batch): the workers' sum is the full-batch mean.
            return full_loss(y_true, y_pred) * (half / len(x))

        model = make_model("shared")
        # The same initial weights whichever worker creates the model, run after run: with each
        # backend's own random init, a run now and then drew weights on which float32 rounding
        # of the two half-batch sums and the full-batch one parted by just over the tolerance.
        rng = np.random.default_rng(SEED)
        model.set_weights([rng.uniform(-0.05, 0.05, np.shape(w)).astype("float32") for w in model.get_weights()])
        opt = RemoteOptimizer(
            keras.optimizers.Adam(learning_rate=0.02),
            self.address,
            model_id=model_id,
            num_workers=num_workers,
            worker_index=worker_index,
            sync_timeout_s=120,
        )
        opt.build(model.trainable_weights)
        initial = model.get_weights()  # the server's values, whoever created the model
        for _ in range(steps):
            opt.apply_gradients(zip(gradients(model, my_loss, my_x, my_y), model.trainable_weights))

        reference = twin(model, "shared_reference")
        reference.set_weights(initial)
        reference_opt = keras.optimizers.Adam(learning_rate=0.02)
        for _ in range(steps):
            reference_opt.apply(gradients(reference, full_loss, x, y), reference.trainable_weights)

        self.facts[f"digest:{model_id}"] = digest(model.get_weights())
        assert int(opt.iterations) == steps
        assert_close(model.get_weights(), reference.get_weights(), "weights vs one process on the full batch")
        assert_close(opt.get_weights(), keras_state(reference_opt), "get_weights() vs local Keras")

    # ------------------------------------------------------------------ Keras API beyond plain updates

    def check_fit_with_weight_decay_exclusions_matches_local(self):
        """`exclude_from_weight_decay(var_names=["bias"])` in the compiled `fit` of every backend."""
        import keras

        from optserve.client import RemoteOptimizer

        x, y = data(seed=41)
        model = make_model("wd_remote")
        local_model = twin(model, "wd_local")

        def make():
            optimizer = keras.optimizers.AdamW(learning_rate=0.05, weight_decay=0.5)
            optimizer.exclude_from_weight_decay(var_names=["bias"])
            return optimizer

        opt = RemoteOptimizer(make(), self.address, model_id=self.model_id("wd"))
        opt.exclude_from_weight_decay(var_names=["bias"])
        local_opt = make()
        model.compile(loss="categorical_crossentropy", optimizer=opt)
        local_model.compile(loss="categorical_crossentropy", optimizer=local_opt)
        model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
        local_model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
        assert_close(model.get_weights(), local_model.get_weights(), "model weights")
        exclusions = opt.get_config()["weight_decay_exclusions"]
        assert exclusions == ["^" + model.layers[0].bias.path + "$"], exclusions
        assert [v.name for v in opt.variables] == [v.name.replace("wd_local", "wd_remote") for v in local_opt.variables]

    def check_tf_model_built_inside_the_first_step_is_refused_clearly(self):
        """A model without `keras.Input` has no variable values while its first traced step builds it."""
        self.require_tensorflow()
        import keras

        from optserve.client import RemoteOptimizer

        model = keras.Sequential([keras.layers.Dense(2, name="lazy_dense")], name="lazy")
        opt = RemoteOptimizer("sgd", self.address, model_id=self.model_id("lazy"))
        model.compile(loss="mse", optimizer=opt)
        try:
            model.train_on_batch(np.ones((1, 3), "float32"), np.ones((1, 2), "float32"))
        except ValueError as error:
            assert "keras.Input" in str(error) and "lazy/lazy_dense/kernel" in str(error), str(error)
        else:
            raise AssertionError("a step on a model built inside the traced step ran")


def run(checks, names, results):
    for name in names:
        try:
            getattr(checks, f"check_{name}")()
            results[name] = "ok"
        except SkipCheck as reason:
            results[name] = f"skip: {reason}"
        except Exception:  # noqa: BLE001 - every failure goes into the report
            results[name] = traceback.format_exc()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--peer", action="append", default=[], metavar="MODEL:WORKER_INDEX:NUM_WORKERS")
    parser.add_argument("--only", nargs="*", help="run only these checks")
    args = parser.parse_args(argv)

    results, facts = {}, {}
    report = {"backend": os.environ.get("KERAS_BACKEND"), "checks": results, "facts": facts}

    # Before anything imports Keras: the plain client must not.
    import optserve.client  # noqa: F401

    facts["keras_imported_by_client"] = "keras" in sys.modules

    checks = Checks(args.address, backend_name())
    checks.facts = facts
    for peer in args.peer:
        model_id, worker_index, num_workers = peer.rsplit(":", 2)
        try:
            checks.run_two_workers(model_id, int(worker_index), int(num_workers))
            results[f"peer:{model_id}"] = "ok"
        except Exception:  # noqa: BLE001
            results[f"peer:{model_id}"] = traceback.format_exc()

    names = (
        args.only
        if args.only is not None
        else [name[len("check_") :] for name in vars(Checks) if name.startswith("check_")]
    )
    run(checks, names, results)
    with open(args.report, "w") as handle:
        json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
