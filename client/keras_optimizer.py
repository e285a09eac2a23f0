"""``RemoteOptimizer``: a Keras 3 optimizer whose state lives on an optserve server.

Users change one line of their Keras program::

    opt = RemoteOptimizer(keras.optimizers.Adam(learning_rate=0.01), "localhost:50051")
    model.compile(loss="categorical_crossentropy", optimizer=opt)
    model.fit(x, y, epochs=2)

Each training step is one ``push_pull`` round trip: the gradients go to the
server, which applies the wrapped optimizer's update (Keras-identical math) and
answers with the new variable values, which are written into the Keras
variables. The slots (momenta, velocities, ...) never leave the server during
training; ``iterations``, ``variables`` and ``get_weights()`` read the server's
copy, and ``set_weights()`` writes it.

Backends: with JAX, ``model.fit`` compiles the train step, which calls
``stateless_apply``; the round trip runs there as an ordered
``jax.experimental.io_callback``. With PyTorch the trainer calls ``apply``
eagerly. See docs/keras.md for what is supported.

This module imports Keras; ``optserve.client`` loads it only when
``RemoteOptimizer`` is first asked for.
"""
from __future__ import annotations

import json
import warnings
import weakref

import keras
import numpy as np
from keras import ops

# Keras internals used on purpose, both present since Keras 3.0:
# - tracking: the model's variables must not be tracked as optimizer variables
#   (Keras's own build() runs under the same decorator);
# - in_stateless_scope: inside a StatelessScope a variable's value comes from the
#   scope, so reading it must not go to the server.
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.utils import tracking

from optserve.client.client import Client, parse_address
from optserve.client.steps import StepTracker

__all__ = ["RemoteOptimizer"]

_MODES = ("sync", "async")
# `variables` is tf.keras's layout, [iterations, *slots]: the counter comes first.
_ITERATIONS_POSITION = 0

# Keyword arguments of the Keras base optimizer that the worker needs to know as
# well as the server: `loss_scale_factor` scales the loss before the gradients
# are computed; the others are reported as attributes, like Keras does.
_BASE_ARGUMENTS = (
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
)


def _run_eagerly_under_torch_compile(function):
    """With `jit_compile=True` on torch, the round trip runs between compiled graphs.

    TorchDynamo cannot trace gRPC calls; left to itself it would try, warn at
    every unsupported call, and break the graph there anyway.
    """
    if keras.backend.backend() != "torch":
        return function
    import torch

    return torch.compiler.disable(function, recursive=True)


@keras.saving.register_keras_serializable(package="optserve")
class RemoteOptimizer(keras.optimizers.Optimizer):
    """A Keras optimizer that trains through an optserve parameter server.

    Args:
        optimizer: the optimizer the server runs: a Keras optimizer instance,
            its `keras.optimizers.serialize()` dict, or a name such as `"adam"`.
            Learning-rate schedules are supported.
        address: the server, `"host:port"`.
        model_id: names the training job on the server. Workers that use the
            same `model_id`, optimizer, variables and `num_workers` share one
            model; the first creates it, the others join it and adopt its values.
        num_workers: workers whose gradients the server sums for each
            synchronous step (an all-reduce "sum": scale each worker's loss so
            that the sum is the gradient you want).
        worker_index: this worker, in `[0, num_workers)`.
        mode: `"sync"` (one update per step from all workers' gradients) or
            `"async"` (every push is applied as it arrives).
        sync_timeout_s: how long the server waits for the workers of a
            synchronous step; 0 uses the server's default.
        timeout: seconds a call to the server may take (retries included),
            except a push, which waits as long as its synchronous step does.
        **kwargs: `name` names this optimizer; any other argument (for example
            `learning_rate=0.01` or `clipnorm=1.0`) overrides the wrapped
            optimizer's configuration.

    The variables are identified on the server by `variable.path`, so every
    worker must build the same model with the same layer names.
    """

    def __init__(
        self,
        optimizer,
        address,
        *,
        model_id="default",
        num_workers=1,
        worker_index=0,
        mode="sync",
        sync_timeout_s=0.0,
        timeout=60.0,
        **kwargs,
    ):
        name = kwargs.pop("name", None)
        address = parse_address(address)
        _check_job_arguments(model_id, num_workers, worker_index, mode, sync_timeout_s, timeout)
        wrapped = _wrapped_optimizer(optimizer, kwargs)
        wrapped_config = _portable_config(wrapped)
        initial_learning_rate = _initial_learning_rate(wrapped)

        super().__init__(
            # A callable keeps Keras from creating a learning-rate variable: the
            # rate lives on the server, and `variables` keeps tf.keras's layout.
            learning_rate=self._server_learning_rate,
            name=name,
            **{key: getattr(wrapped, key) for key in _BASE_ARGUMENTS},
        )
        self.address = address
        self.model_id = model_id
        self.num_workers = int(num_workers)
        self.worker_index = int(worker_index)
        self.mode = mode
        self.sync_timeout_s = float(sync_timeout_s)
        self.timeout = None if timeout is None else float(timeout)
        # JSON text, not a dict: an attribute dict would be wrapped by Keras's tracker.
        self._wrapped_config_json = json.dumps(wrapped_config)
        self._client = None
        self._learning_rate_value = initial_learning_rate
        self._steps = StepTracker()  # shared with self.client: the one record of the server's counters
        self._slots_stale = False
        self._refreshing = False
        self._variable_names = []
        self._slot_mirrors = []
        self._replace_iterations_variable()

    # ------------------------------------------------------------------ configuration

    @property
    def wrapped_config(self):
        """The wrapped optimizer, as `keras.optimizers.serialize()` gives it."""
        return json.loads(self._wrapped_config_json)

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": self.wrapped_config,
            "address": self.address,
            "model_id": self.model_id,
            "num_workers": self.num_workers,
            "worker_index": self.worker_index,
            "mode": self.mode,
            "sync_timeout_s": self.sync_timeout_s,
            "timeout": self.timeout,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)

    def _server_optimizer_config(self):
        # Keras names optimizer instances "adam", "adam_1", ... in creation order;
        # the server compares configs to let workers join, so the name stays out.
        config = self.wrapped_config
        config["config"].pop("name", None)
        return config

    # ------------------------------------------------------------------ connection

    @property
    def client(self):
        """The `optserve.client.Client` this optimizer talks through (created on first use)."""
        if self._client is None:
            self._client = Client(self.address, timeout=self.timeout, step_tracker=self._steps)
        return self._client

    def close(self):
        """Close the connection to the server; the server keeps the model."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # ------------------------------------------------------------------ build

    @tracking.no_automatic_dependency_tracking
    def build(self, variables):
        """Create the model on the server from `variables`' current values, or join it.

        When the model already exists (another worker created it, or this job
        is resuming), the server's variable values are adopted.
        """
        if self.built:
            return
        variables = list(variables)
        names = _variable_names(variables)
        initial_values = {name: _to_numpy(v) for name, v in zip(names, variables)}
        info = self.client.create_model(
            self.model_id,
            self._server_optimizer_config(),
            initial_values,
            num_workers=self.num_workers,
            mode=self.mode,
            sync_timeout_s=self.sync_timeout_s,
        )
        _check_server_layout(self.model_id, info, names, initial_values)
        # One more round trip, at build only: the slots' shapes and initial values
        # (and, when joining, the variables' values).
        weights = self.client.get_weights(self.model_id, include_variables=not info.created)
        if not info.created:
            for name, variable in zip(names, variables):
                variable.assign(weights.variables[name])

        self._variable_names = names
        self._trainable_variables = variables[:]
        for index, variable in enumerate(variables):
            self._trainable_variables_indices[self._var_key(variable)] = index
        with keras.name_scope(self.name, caller=self):
            for name in names:
                for slot, value in weights.slots.get(name, {}).items():
                    mirror = self._add_mirror(value, f"{name.replace('/', '_')}_{slot}")
                    self._slot_mirrors.append((name, slot, mirror))
        self._adopt_state(weights.iterations, weights.learning_rate)
        self._slots_stale = False
        self.built = True

    # ------------------------------------------------------------------ applying gradients

    def apply_gradients(self, grads_and_vars, name=None, experimental_aggregate_gradients=True):
        """Push `(gradient, variable)` pairs; one round trip. Returns `iterations`.

        `experimental_aggregate_gradients=False` says the gradients are already
        summed across workers: the server applies them once per step as they are.
        """
        grads_and_vars = list(grads_and_vars)
        if not grads_and_vars:
            return self._iterations
        grads, variables = zip(*grads_and_vars)
        self._apply(list(grads), list(variables), aggregated=not experimental_aggregate_gradients)
        return self._iterations

    def apply(self, grads, trainable_variables=None):
        """Push `grads` (one per variable, `None` to skip one); one round trip."""
        self._apply(list(grads), trainable_variables, aggregated=False)

    @_run_eagerly_under_torch_compile
    def _apply(self, grads, trainable_variables, aggregated):
        if len(grads) == 0:
            return
        _refuse_traced(grads)
        variables = self._variables_for(grads, trainable_variables)
        grads, variables = self._filter_empty_gradients(grads, variables)
        names = [self._name_of(v) for v in variables]
        values = self._push_pull({name: _to_numpy(g) for name, g in zip(names, grads)}, aggregated)
        for name, variable in zip(self._variable_names, self._trainable_variables):
            variable.assign(values[name])
        self._apply_constraints()

    def _variables_for(self, grads, trainable_variables):
        # The same checks, in the same words, as Keras's BaseOptimizer.apply.
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must already be built "
                    "on a list of variables. Call `optimizer.build(trainable_variables)` first."
                )
            if len(grads) != len(self._trainable_variables):
                raise ValueError(
                    "When passing `grads` as a list of gradient tensors, the gradients must match "
                    f"the variables one-to-one. Received a list of {len(grads)} gradients, but the "
                    f"optimizer is tracking {len(self._trainable_variables)} trainable variables."
                )
            return list(self._trainable_variables)
        variables = list(trainable_variables)
        if len(grads) != len(variables):
            raise ValueError(
                f"Received {len(grads)} gradients for {len(variables)} variables; "
                "they must match one-to-one."
            )
        if not self.built:
            self.build(variables)
        self._check_variables_are_known(variables)
        return variables

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        """What the JAX trainer calls (inside `jax.jit` by default): one round trip.

        Returns the server's new variable values and `optimizer_variables` with
        the new iteration count. The slot entries are passed through unchanged:
        the slots live on the server, and the optimizer variables re-read it.
        """
        if not self.built:
            raise ValueError(
                "To call `stateless_apply`, RemoteOptimizer must be built. "
                "You can build it via `optimizer.build(trainable_variables)`."
            )
        if len(trainable_variables) != len(self._trainable_variables):
            raise ValueError(
                "Argument `trainable_variables` must match the variables the optimizer was built with "
                f"one-to-one. Received {len(trainable_variables)} values, expected "
                f"{len(self._trainable_variables)}."
            )
        if len(optimizer_variables) != len(self.variables):
            raise ValueError(
                f"Argument `optimizer_variables` must match `optimizer.variables` one-to-one. Received "
                f"{len(optimizer_variables)} values, expected {len(self.variables)}."
            )
        if keras.backend.backend() == "jax":
            new_values, new_iterations = self._jax_stateless_step(grads, trainable_variables)
        else:
            new_values, new_iterations = self._eager_stateless_step(grads, trainable_variables)
        optimizer_variables = list(optimizer_variables)
        optimizer_variables[_ITERATIONS_POSITION] = new_iterations
        return new_values, optimizer_variables

    def _jax_stateless_step(self, grads, trainable_variables):
        import jax
        from jax.experimental import io_callback

        value_types = [jax.ShapeDtypeStruct(np.shape(v), v.dtype) for v in trainable_variables]
        iterations_type = jax.ShapeDtypeStruct((), self._iterations.dtype)

        def host_step(*host_grads):
            # Runs on the host with NumPy arrays, once per step, in program order.
            values = self._push_pull(dict(zip(self._variable_names, host_grads)), aggregated=False)
            new_values = [
                np.asarray(values[name], dtype=t.dtype) for name, t in zip(self._variable_names, value_types)
            ]
            return new_values, np.asarray(self._server_iterations, dtype=iterations_type.dtype)

        new_values, new_iterations = io_callback(
            host_step, (value_types, iterations_type), *grads, ordered=True
        )
        new_values = self._stateless_constraints(list(new_values), io_callback)
        return new_values, new_iterations

    def _eager_stateless_step(self, grads, trainable_variables):
        host_grads = {name: _to_numpy(g) for name, g in zip(self._variable_names, grads)}
        values = self._push_pull(host_grads, aggregated=False)
        new_values = [
            ops.convert_to_tensor(values[name], dtype=v.dtype)
            for name, v in zip(self._variable_names, self._trainable_variables)
        ]
        new_values = self._stateless_constraints(new_values, None)
        return new_values, ops.convert_to_tensor(self._server_iterations, dtype=self._iterations.dtype)

    def _push_pull(self, grads, aggregated):
        """The one round trip of a step: push gradients, receive every variable's new value."""
        result, values = self.client.push_pull(
            self.model_id, grads, worker_index=self.worker_index, aggregated=aggregated
        )
        missing = [name for name in self._variable_names if name not in values]
        if missing:
            raise RuntimeError(
                f"The server's answer for model {self.model_id!r} lacks the variables {missing}."
            )
        self._adopt_state(result.iterations, result.learning_rate)
        self._slots_stale = True
        return values

    # ------------------------------------------------------------------ constraints

    def _apply_constraints(self):
        """Keras applies `variable.constraint` after each update; the server must keep the result too."""
        constrained = {}
        for name, variable in zip(self._variable_names, self._trainable_variables):
            if variable.constraint is not None:
                variable.assign(variable.constraint(variable))
                constrained[name] = _to_numpy(variable)
        if constrained:
            self.client.set_weights(self.model_id, variables=constrained)

    def _stateless_constraints(self, new_values, io_callback):
        constrained = {}
        for index, (name, variable) in enumerate(zip(self._variable_names, self._trainable_variables)):
            if variable.constraint is not None:
                new_values[index] = variable.constraint(new_values[index])
                constrained[name] = new_values[index]
        if not constrained:
            return new_values
        names = list(constrained)

        def write_back(*arrays):
            self.client.set_weights(self.model_id, variables=dict(zip(names, map(np.asarray, arrays))))

        if io_callback is None:
            write_back(*[_to_numpy(constrained[name]) for name in names])
        else:
            io_callback(write_back, None, *[constrained[name] for name in names], ordered=True)
        return new_values

    def finalize_variable_values(self, var_list):
        """With `use_ema`, the model variables take their moving averages, here and on the server."""
        if not self.use_ema or not self.built:
            return
        slots = self.client.get_weights(self.model_id).slots
        averages = {name: slots[name]["average"] for name in self._variable_names if "average" in slots.get(name, {})}
        known = {self._var_key(v): n for n, v in zip(self._variable_names, self._trainable_variables)}
        for variable in var_list:
            name = known.get(self._var_key(variable))
            if name in averages:
                variable.assign(averages[name])
        if averages:
            self.client.set_weights(self.model_id, variables=averages)
            self._slots_stale = True

    # ------------------------------------------------------------------ state: iterations, learning rate

    @property
    def iterations(self):
        """The server's public iteration counter, as of this worker's last step."""
        return self._iterations

    @property
    def learning_rate(self):
        """The rate the next update uses (the schedule evaluated at the current step)."""
        return self._server_learning_rate()

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        raise TypeError(
            "The learning rate of a RemoteOptimizer lives on the optserve server and cannot be set "
            "from the worker. Give the wrapped optimizer the rate or a "
            "`keras.optimizers.schedules.LearningRateSchedule` instead. "
            f"Received: learning_rate={learning_rate}"
        )

    def _server_learning_rate(self):
        return ops.convert_to_tensor(self._learning_rate_value, dtype=keras.backend.floatx())

    def _get_current_learning_rate(self):
        return self._server_learning_rate()

    @property
    def _server_iterations(self):
        """The server's iterations counter as of the last reply (0 before any)."""
        return self._steps.progress(self.model_id).iterations or 0

    def _adopt_state(self, iterations, learning_rate):
        self._steps.record_progress(self.model_id, iterations=int(iterations))
        self._learning_rate_value = float(learning_rate)

    # ------------------------------------------------------------------ state: weights

    @property
    def weights(self):
        """Same as `variables`: `[iterations, *slots]`, read from the server."""
        return self.variables

    def get_weights(self):
        """The server's optimizer state in tf.keras's layout: `[iterations, *slots]`."""
        self._check_built("get_weights")
        weights = self.client.get_weights(self.model_id)
        self._adopt_state(weights.iterations, weights.learning_rate)
        return weights.as_list()

    def set_weights(self, weights):
        """Overwrite the server's optimizer state from `[iterations, *slots]`.

        The count and every shape are checked first (ValueError naming the bad
        entry); a rejected list changes nothing.
        """
        self._check_built("set_weights")
        state = self.client.set_weights_list(self.model_id, [_to_numpy(w) for w in weights])
        self._adopt_state(state.iterations, state.learning_rate)
        self._slots_stale = True

    def save_own_variables(self, store):
        """Saving a model (`model.save`) stores the server's optimizer state."""
        if not self.built:
            return
        for index, value in enumerate(self.get_weights()):
            store[str(index)] = value

    def load_own_variables(self, store):
        """Loading a model writes the saved optimizer state to the server."""
        if not self.built:
            warnings.warn(
                f"Skipping variable loading for optimizer '{self.name}', because it has not been "
                "called/built yet.",
                stacklevel=2,
            )
            return
        count = len(self.variables)
        if len(store.keys()) != count:
            warnings.warn(
                f"Skipping variable loading for optimizer '{self.name}', because it has {count} "
                f"variables whereas the saved optimizer has {len(store.keys())} variables.",
                stacklevel=2,
            )
            return
        self.set_weights([store[str(index)] for index in range(count)])

    def _check_built(self, method):
        if not self.built:
            raise ValueError(
                f"You are calling `{method}()` on an optimizer that has not yet been built. Please call "
                "`optimizer.build(trainable_variables)` to create the optimizer weights first."
            )

    # ------------------------------------------------------------------ mirrors of server state

    def _replace_iterations_variable(self):
        # Keras created a plain "iteration" variable; a mirror takes its place and position.
        plain = self._iterations
        self._untrack_variable(plain)
        with keras.name_scope(self.name, caller=self):
            mirror = self._add_mirror(np.zeros((), dtype=plain.dtype), "iteration")
        self._iterations = mirror

    def _add_mirror(self, value, name):
        variable_class = _mirror_class(keras.Variable)
        mirror = variable_class(
            initializer=np.asarray(value), shape=np.shape(value), dtype=np.asarray(value).dtype.name,
            trainable=False, name=name,
        )
        mirror._owner = weakref.ref(self)
        mirror._server_snapshot = mirror._value
        self._track_variable(mirror)
        return mirror

    def _refresh_mirror(self, mirror):
        """Bring a mirror up to date with the server before its value is read."""
        if self._refreshing or in_stateless_scope():
            return
        self._refreshing = True
        try:
            if mirror is self._iterations:
                self._refresh_iterations()
            elif self._slots_stale or mirror._value is not mirror._server_snapshot:
                self._refresh_slots()
        finally:
            self._refreshing = False

    def _refresh_iterations(self):
        mirror = self._iterations
        current = mirror._value
        # The counter comes with every step's answer; no round trip is needed.
        if current is None or current is not mirror._server_snapshot or int(current) != self._server_iterations:
            _overwrite(mirror, np.asarray(self._server_iterations, dtype=mirror.dtype))

    def _refresh_slots(self):
        weights = self.client.get_weights(self.model_id)
        self._adopt_state(weights.iterations, weights.learning_rate)
        for name, slot, mirror in self._slot_mirrors:
            _overwrite(mirror, weights.slots[name][slot])
        self._slots_stale = False
        self._refresh_iterations()

    def _name_of(self, variable):
        return self._variable_names[self._get_variable_index(variable)]


# --------------------------------------------------------------------------- mirror variables

_MIRROR_CLASSES: dict[type, type] = {}  # backend Variable class -> its mirror subclass


def _mirror_class(base):
    """A subclass of the backend's Variable whose reads refresh it from the server.

    Keras's JAX trainer writes the optimizer variables back at the end of an
    epoch with the values it carried through the compiled step (the slots there
    are stale, since they never leave the server). A refresh-on-read keeps every
    read correct however the variable was written: a mirror whose value is not
    the one last fetched, or whose optimizer stepped since, is fetched again.
    """
    if base not in _MIRROR_CLASSES:

        class ServerStateVariable(base):
            _owner = None
            _server_snapshot = None

            @property
            def value(self):
                owner = self._owner() if self._owner is not None else None
                if owner is not None:
                    owner._refresh_mirror(self)
                return super().value

        ServerStateVariable.__qualname__ = ServerStateVariable.__name__ = f"ServerState{base.__name__}"
        _MIRROR_CLASSES[base] = ServerStateVariable
    return _MIRROR_CLASSES[base]


def _overwrite(mirror, value):
    mirror.assign(value)
    mirror._server_snapshot = mirror._value


# --------------------------------------------------------------------------- helpers


def _check_job_arguments(model_id, num_workers, worker_index, mode, sync_timeout_s, timeout):
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"`model_id` must be a non-empty string. Received: model_id={model_id!r}")
    if not _is_int(num_workers) or num_workers < 1:
        raise ValueError(f"`num_workers` must be an integer >= 1. Received: num_workers={num_workers!r}")
    if not _is_int(worker_index) or not 0 <= worker_index < num_workers:
        raise ValueError(
            f"`worker_index` must be an integer in [0, num_workers). "
            f"Received: worker_index={worker_index!r} with num_workers={num_workers}"
        )
    if mode not in _MODES:
        raise ValueError(f"`mode` must be one of {_MODES}. Received: mode={mode!r}")
    if not _is_number(sync_timeout_s) or not sync_timeout_s >= 0:
        raise ValueError(
            f"`sync_timeout_s` must be a number >= 0 (0: the server's default). Received: sync_timeout_s={sync_timeout_s!r}"
        )
    if timeout is not None and (not _is_number(timeout) or not timeout > 0):
        raise ValueError(f"`timeout` must be a number > 0 or None. Received: timeout={timeout!r}")


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _wrapped_optimizer(optimizer, overrides):
    """A Keras optimizer instance from any accepted form, with `overrides` applied (validates eagerly)."""
    if isinstance(optimizer, RemoteOptimizer):
        raise ValueError("`optimizer` must be a plain Keras optimizer, not another RemoteOptimizer.")
    if isinstance(optimizer, str):
        instance = keras.optimizers.get(optimizer)
    elif isinstance(optimizer, dict):
        config = dict(optimizer)
        if "class_name" not in config:
            raise ValueError(
                "`optimizer` given as a dict must be a `keras.optimizers.serialize()` result "
                f"(with 'class_name'). Received keys: {sorted(config)}"
            )
        if "config" not in config:  # a bare get_config() dict with its class name beside it
            config = {"class_name": config.pop("class_name"), "config": config}
        instance = keras.optimizers.deserialize(config)
    elif isinstance(optimizer, keras.optimizers.Optimizer):
        instance = optimizer
    else:
        raise TypeError(
            "`optimizer` must be a Keras optimizer, its serialized config or a name such as 'adam'. "
            f"Received: optimizer={optimizer!r}"
        )
    if isinstance(instance, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "`optimizer` must not be a LossScaleOptimizer; set `loss_scale_factor` on the wrapped "
            "optimizer instead."
        )
    if overrides:
        config = instance.get_config()
        config.update(overrides)
        instance = instance.__class__.from_config(config)
    lr = instance._learning_rate
    if callable(lr) and not isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        raise ValueError(
            "The wrapped optimizer's `learning_rate` must be a float or a "
            "`keras.optimizers.schedules.LearningRateSchedule` (the server evaluates it). "
            f"Received: learning_rate={lr!r}"
        )
    return instance


def _portable_config(instance):
    """`keras.optimizers.serialize(instance)`, the same on every backend.

    On the torch backend Keras serializes built-in optimizers under their
    torch-specific module; workers on other backends would then disagree with it.
    """
    config = keras.optimizers.serialize(instance)
    class_name = config.get("class_name")
    public = getattr(keras.optimizers, class_name, None) if isinstance(class_name, str) else None
    if isinstance(public, type) and isinstance(instance, public):
        config["module"] = "keras.optimizers"
        config["registered_name"] = None
    return json.loads(json.dumps(config, default=_json_default))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _initial_learning_rate(instance):
    return float(_to_numpy(instance.learning_rate))


def _variable_names(variables):
    names = [getattr(v, "path", None) or v.name for v in variables]
    seen = set()
    duplicates = sorted({n for n in names if n in seen or seen.add(n)})
    if duplicates:
        raise ValueError(
            "RemoteOptimizer identifies variables by `variable.path`, which must be unique; "
            f"these appear more than once: {duplicates}. Give the layers distinct names."
        )
    return names


def _check_server_layout(model_id, info, names, values):
    server = [(v.name, tuple(v.shape)) for v in info.variables]
    local = [(name, tuple(np.shape(values[name]))) for name in names]
    if server != local:
        raise ValueError(
            f"Model {model_id!r} on the server has the variables {server}, but this worker's are "
            f"{local}. Every worker must build the same model (same layer names), or use another `model_id`."
        )


def _to_numpy(value):
    if isinstance(value, keras.Variable):
        # The tensor, not the Variable: Variable.__array__ predates NumPy 2's `copy` argument.
        value = value.value
    return np.asarray(ops.convert_to_numpy(value))


def _refuse_traced(grads):
    if keras.backend.backend() != "jax":
        return
    import jax

    if any(isinstance(g, jax.core.Tracer) for g in grads if g is not None):
        raise ValueError(
            "RemoteOptimizer.apply() cannot run inside a traced function (jax.jit, jax.grad): "
            "it assigns Keras variables. Call it eagerly, or use "
            "`optimizer.stateless_apply(optimizer_variables, grads, trainable_variables)`, which "
            "works inside jax.jit (model.fit uses it)."
        )
