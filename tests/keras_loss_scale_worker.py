"""One Keras worker process for tests/test_keras_loss_scale.py: loss scaling and mixed precision.

    KERAS_BACKEND=jax python tests/keras_loss_scale_worker.py --address 127.0.0.1:PORT --report out.json

Every check compares a remote run with local Keras in the same process. The
report is ``{"checks": {name: "ok" | "skip: why" | traceback}, "facts": {...}}``,
as tests/keras_worker.py writes it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from keras_worker import assert_close, backend_name, data, make_model, run, twin  # noqa: E402

# Batches of 8 over 40 samples: 5 steps an epoch. Batch 2's inputs are infinite,
# so its loss and gradients are NaN: a step LossScaleOptimizer skips.
SAMPLES, BATCH, NAN_BATCH = 40, 8, 2
SEED = 4321
MIXED_ATOL = 2e-4  # see _assert_loss_scale_like_keras


def poisoned_data(seed):
    x, y = data(n=SAMPLES, seed=seed)
    x[NAN_BATCH * BATCH : (NAN_BATCH + 1) * BATCH] = np.inf
    return x, y


def loss_scale_adam():
    import keras

    return keras.optimizers.LossScaleOptimizer(
        keras.optimizers.Adam(learning_rate=0.05), initial_scale=2.0**8, dynamic_growth_steps=2
    )


@contextlib.contextmanager
def global_policy(name):
    import keras

    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def eager_keras_loss_scaling():
    """Keras's own LossScaleOptimizer.apply traces its branches on JAX; without jit it runs eagerly."""
    import keras

    if keras.backend.backend() != "jax":
        return contextlib.nullcontext()
    import jax

    return jax.disable_jit()


def scale_state(optimizer):
    return float(np.asarray(optimizer.dynamic_scale.value)), int(np.asarray(optimizer.step_counter.value))


class Checks:
    def __init__(self, address, backend):
        self.address = address
        self.backend = backend
        self.facts = {}

    def model_id(self, name):
        return f"{self.backend}-lso-{name}-{os.getpid()}"

    def _fit_pair(self, name, remote_opt, local_opt, x, y, epochs=1, **compile_args):
        model = make_model(f"{name}_remote")
        local_model = twin(model, f"{name}_local")
        model.compile(loss="categorical_crossentropy", optimizer=remote_opt, **compile_args)
        local_model.compile(loss="categorical_crossentropy", optimizer=local_opt, **compile_args)
        model.fit(x, y, epochs=epochs, batch_size=BATCH, shuffle=False, verbose=0)
        local_model.fit(x, y, epochs=epochs, batch_size=BATCH, shuffle=False, verbose=0)
        return model, local_model

    def _assert_loss_scale_like_keras(self, remote_opt, local_opt, model, local_model, what, float16=False):
        differences = [
            float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
            for a, b in zip(model.get_weights(), local_model.get_weights())
        ]
        self.facts[f"max_weight_difference:{what}"] = max(differences)
        if float16:
            # The server's float32 update and the backend's own Keras kernels may differ in
            # the last bit (about 1e-7 here); under mixed_float16 such a bit can flip how a
            # weight rounds to float16 in the next forward pass, and the gradients then
            # differ at float16 precision (up to 3e-5 in the weights measured, depending on
            # the initial weights). Two local twins agree exactly. The loss scaling itself is
            # compared exactly: scale, counter and skipped steps.
            for index, (a, e) in enumerate(zip(model.get_weights(), local_model.get_weights())):
                np.testing.assert_allclose(a, e, rtol=1e-4, atol=MIXED_ATOL, err_msg=f"{what}: weights[{index}]")
        else:
            assert_close(model.get_weights(), local_model.get_weights(), f"{what}: model weights")
        assert scale_state(remote_opt) == scale_state(local_opt), (
            f"{what}: (scale, counter) {scale_state(remote_opt)}, Keras has {scale_state(local_opt)}"
        )
        assert int(remote_opt.iterations) == int(local_opt.iterations), (
            f"{what}: iterations {int(remote_opt.iterations)}, Keras has {int(local_opt.iterations)}"
        )

    # ------------------------------------------------------------------ RemoteOptimizer(LossScaleOptimizer(...))

    def check_remote_loss_scale_fit_skips_the_steps_keras_skips(self):
        """Compiled steps (jax.jit, tf.function) and eager ones: the server's scale, counter and skips."""
        from optserve.client import RemoteOptimizer

        x, y = poisoned_data(seed=21)
        modes = {
            "compiled": {},
            "eager": {"run_eagerly": True},
            "three steps per execution": {"steps_per_execution": 3},
        }
        if self.backend == "torch":
            del modes["three steps per execution"]  # Keras's torch trainer runs one step per call
        for what, compile_args in modes.items():
            opt = RemoteOptimizer(loss_scale_adam(), self.address, model_id=self.model_id(f"fit-{what[:5]}"))
            local_opt = loss_scale_adam()
            model, local_model = self._fit_pair(f"lso_{what[:5]}", opt, local_opt, x, y, **compile_args)
            # 5 steps, the third skipped; the scale doubled after 2 finite steps, halved, doubled.
            assert int(local_opt.iterations) == 4 and scale_state(local_opt) == (512.0, 0), scale_state(local_opt)
            self._assert_loss_scale_like_keras(opt, local_opt, model, local_model, f"RemoteOptimizer(LSO) {what}")
            state = opt.client.get_weights(opt.model_id).scalars
            assert state["dynamic_scale"] == scale_state(local_opt)[0], state

    def check_remote_loss_scale_attributes_behave_like_keras(self):
        import keras

        from optserve.client import RemoteOptimizer

        opt = RemoteOptimizer(loss_scale_adam(), self.address, model_id=self.model_id("attributes"))
        local_opt = loss_scale_adam()
        assert isinstance(opt, keras.optimizers.LossScaleOptimizer) and isinstance(opt, RemoteOptimizer)
        assert opt.name == "loss_scale_optimizer" or opt.name.startswith("loss_scale_optimizer"), opt.name
        assert isinstance(opt.inner_optimizer, keras.optimizers.Adam)
        assert abs(opt.inner_optimizer.get_config()["learning_rate"] - 0.05) < 1e-8
        assert (opt.initial_scale, opt.dynamic_growth_steps) == (2.0**8, 2)
        assert float(opt.scale_loss(2.0)) == float(local_opt.scale_loss(2.0)) == 512.0  # before build: initial_scale
        config = opt.get_config()
        again = RemoteOptimizer.from_config(json.loads(json.dumps(config)))
        assert type(again) is type(opt) and again.get_config() == config
        x, y = poisoned_data(seed=22)
        model, local_model = self._fit_pair("lso_attributes", opt, local_opt, x, y, epochs=1)
        assert model.optimizer is opt  # compile did not wrap it again
        assert float(opt.scale_loss(2.0)) == float(local_opt.scale_loss(2.0))
        assert [v.name for v in opt.variables][-2:] == ["step_counter", "dynamic_scale"]
        weights = opt.get_weights()
        assert (float(weights[-1]), int(weights[-2])) == scale_state(local_opt)

    def check_remote_loss_scale_save_and_load_model_keeps_the_scale(self):
        import keras

        from optserve.client import RemoteOptimizer

        x, y = poisoned_data(seed=23)
        opt = RemoteOptimizer(loss_scale_adam(), self.address, model_id=self.model_id("save"))
        model = make_model("lso_save")
        model.compile(loss="categorical_crossentropy", optimizer=opt)
        model.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, verbose=0)
        saved_state = scale_state(opt)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.keras")
            model.save(path)
            # Another scale on the server: loading must write the saved one back.
            opt.set_weights([*opt.get_weights()[:-2], np.int64(1), np.float32(4.0)])
            assert scale_state(opt) == (4.0, 1)
            loaded = keras.saving.load_model(path)
        assert isinstance(loaded.optimizer, keras.optimizers.LossScaleOptimizer), type(loaded.optimizer)
        assert isinstance(loaded.optimizer, RemoteOptimizer)
        assert loaded.optimizer.model_id == opt.model_id
        assert scale_state(loaded.optimizer) == saved_state, (scale_state(loaded.optimizer), saved_state)
        assert loaded.optimizer.client.get_weights(opt.model_id).scalars["dynamic_scale"] == saved_state[0]

    # ------------------------------------------------------------------ isinstance and names

    def check_remote_optimizer_is_an_instance_of_the_wrapped_class(self):
        import keras

        from optserve.client import RemoteOptimizer

        for wrapped in (keras.optimizers.SGD(), keras.optimizers.Adam(), "rmsprop"):
            opt = RemoteOptimizer(wrapped, self.address, model_id=self.model_id(f"isinstance-{id(wrapped)}"))
            keras_class = type(keras.optimizers.get(wrapped)) if isinstance(wrapped, str) else type(wrapped)
            public = getattr(keras.optimizers, keras_class.__name__)
            assert isinstance(opt, public) and isinstance(opt, RemoteOptimizer), type(opt).__mro__
            assert not isinstance(opt, keras.optimizers.LossScaleOptimizer)
            # Named as the wrapped optimizer (Keras numbers repeated names: "sgd", "sgd_1").
            expected = wrapped.name if not isinstance(wrapped, str) else keras.optimizers.get(wrapped).name
            assert re.sub(r"_\d+$", "", opt.name) == re.sub(r"_\d+$", "", expected), (opt.name, expected)
            again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
            assert type(again) is type(opt)

    # ------------------------------------------------------------------ mixed_float16

    def check_mixed_float16_fit_with_keras_wrapping_matches_local(self):
        """compile() wraps RemoteOptimizer(Adam) in Keras's LossScaleOptimizer: the scale lives in the worker."""
        import keras

        from optserve.client import RemoteOptimizer

        x, y = poisoned_data(seed=24)
        with global_policy("mixed_float16"):
            for run_eagerly in (False, True):
                what = "eager" if run_eagerly else "compiled"
                opt = RemoteOptimizer(
                    keras.optimizers.Adam(learning_rate=0.05), self.address, model_id=self.model_id(f"mixed-{what}")
                )
                local_opt = keras.optimizers.Adam(learning_rate=0.05)
                model, local_model = self._fit_pair(f"mixed_{what}", opt, local_opt, x, y, run_eagerly=run_eagerly)
                assert model.layers[0].kernel.dtype == "float32" and model.layers[0].compute_dtype == "float16"
                wrapper, local_wrapper = model.optimizer, local_model.optimizer
                assert isinstance(wrapper, keras.optimizers.LossScaleOptimizer) and wrapper.inner_optimizer is opt
                self._assert_loss_scale_like_keras(
                    wrapper, local_wrapper, model, local_model, f"mixed_float16 {what}", float16=True
                )

    def check_mixed_float16_fit_with_remote_loss_scale_matches_local(self):
        """RemoteOptimizer(LossScaleOptimizer(Adam)) under mixed_float16: not wrapped twice, the scale on the server."""
        from optserve.client import RemoteOptimizer

        x, y = poisoned_data(seed=25)
        with global_policy("mixed_float16"):
            opt = RemoteOptimizer(loss_scale_adam(), self.address, model_id=self.model_id("mixed-remote"))
            local_opt = loss_scale_adam()
            model, local_model = self._fit_pair("mixed_remote", opt, local_opt, x, y)
            assert model.optimizer is opt
            self._assert_loss_scale_like_keras(
                opt, local_opt, model, local_model, "mixed_float16 RemoteOptimizer(LSO)", float16=True
            )

    def check_mixed_float16_save_and_load_model_keeps_both_scales(self):
        """Keras's wrapper saves its scale in the file; the inner RemoteOptimizer's state goes to the server."""
        import keras

        from optserve.client import RemoteOptimizer

        x, y = poisoned_data(seed=28)
        with global_policy("mixed_float16"), tempfile.TemporaryDirectory() as folder:
            opt = RemoteOptimizer(keras.optimizers.Adam(0.05), self.address, model_id=self.model_id("mixed-save"))
            model = make_model("mixed_save")
            model.compile(loss="categorical_crossentropy", optimizer=opt)
            model.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, verbose=0)
            saved_scale, saved_iterations = scale_state(model.optimizer), int(opt.iterations)
            path = os.path.join(folder, "model.keras")
            model.save(path)
            loaded = keras.saving.load_model(path)
            wrapper = loaded.optimizer
            assert isinstance(wrapper, keras.optimizers.LossScaleOptimizer), type(wrapper)
            assert isinstance(wrapper.inner_optimizer, RemoteOptimizer), type(wrapper.inner_optimizer)
            assert isinstance(wrapper.inner_optimizer, keras.optimizers.Adam)
            assert wrapper.inner_optimizer.model_id == opt.model_id
            assert scale_state(wrapper) == saved_scale, (scale_state(wrapper), saved_scale)
            assert int(wrapper.iterations) == saved_iterations
            loaded.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, verbose=0)
            assert int(wrapper.iterations) == saved_iterations + 4  # one more skipped step of 5

    def check_loss_scale_wrapping_remote_optimizer_applies_eagerly(self):
        """LossScaleOptimizer(RemoteOptimizer(...)).apply(), eagerly, with a finite and a non-finite step."""
        import keras

        from optserve.client import RemoteOptimizer

        rng = np.random.default_rng(26)
        initial = [rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(3,)).astype("float32")]
        remote_vars = [keras.Variable(v, name=f"eager_lso_{i}") for i, v in enumerate(initial)]
        local_vars = [keras.Variable(v, name=f"eager_lso_{i}") for i, v in enumerate(initial)]
        inner = RemoteOptimizer(keras.optimizers.Adam(0.05), self.address, model_id=self.model_id("eager-wrapped"))
        opt = keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0**8, dynamic_growth_steps=2)
        local_opt = loss_scale_adam()
        for step in range(5):
            grads = [rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(3,)).astype("float32")]
            if step == 2:
                grads[1][0] = np.inf
            opt.apply([g * 256.0 for g in grads], remote_vars)
            with eager_keras_loss_scaling():
                local_opt.apply([g * 256.0 for g in grads], local_vars)
        assert_close(remote_vars, local_vars, "variables")
        assert scale_state(opt) == scale_state(local_opt), (scale_state(opt), scale_state(local_opt))
        assert int(inner.iterations) == int(local_opt.iterations) == 4

    # ------------------------------------------------------------------ float16 variables

    def check_float16_variables_are_refused_at_build(self):
        """The server keeps float32 or float64 variables (mixed_float16's are float32): a clear error, nothing made."""
        import keras

        from optserve.client import RemoteOptimizer
        from optserve.client.client import InvalidArgumentError

        variables = [keras.Variable(np.ones((2, 2), "float16"), dtype="float16", name="half_kernel")]
        opt = RemoteOptimizer(keras.optimizers.SGD(0.1), self.address, model_id=self.model_id("half"))
        try:
            opt.apply([np.ones((2, 2), "float16")], variables)
        except InvalidArgumentError as error:
            assert "float16" in str(error) and "float32" in str(error), error
        else:
            raise AssertionError("float16 variables were accepted")
        assert not opt.built
        assert keras.ops.convert_to_numpy(variables[0]).tolist() == [[1.0, 1.0], [1.0, 1.0]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--only", nargs="*", help="run only these checks")
    args = parser.parse_args(argv)
    results, facts = {}, {}
    import keras

    keras.utils.set_random_seed(SEED)  # the same initial weights in every run
    checks = Checks(args.address, backend_name())
    checks.facts = facts
    names = args.only or [name[len("check_") :] for name in vars(Checks) if name.startswith("check_")]
    run(checks, names, results)
    with open(args.report, "w") as handle:
        json.dump({"backend": os.environ.get("KERAS_BACKEND"), "checks": results, "facts": facts}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
