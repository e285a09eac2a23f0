"""``RemoteOptimizer`` for tf_keras (Keras 2): the optimizer API of ``tf.keras`` before Keras 3.

With ``TF_USE_LEGACY_KERAS=1`` (or ``import tf_keras``), Keras 2 programs change one line::

    from optserve.client.tf_keras_optimizer import RemoteOptimizer

    opt = RemoteOptimizer(tf.keras.optimizers.Adam(0.01), "localhost:50051")
    model.compile(loss="mse", optimizer=opt)
    model.fit(x, y)

The same server and the same configs as Keras 3's ``RemoteOptimizer``: a
tf_keras optimizer's ``get_config()`` is sent in Keras 3's serialized form,
and the server runs the Keras 3 math, which tf_keras's own optimizers share
for the classes the server has (docs/keras.md lists the exceptions). The
round trip runs eagerly, or inside ``tf.function`` (``fit``'s train step) as
one ``tf.py_function`` (``client/keras_tensorflow.py``).

The Keras 2 API: ``apply_gradients(grads_and_vars, name=None,
skip_gradients_aggregation=False, experimental_aggregate_gradients=True)``,
``minimize``, ``iterations``, ``learning_rate``/``lr``, ``variables`` and
``weights`` (``[iterations, *slots]``, read from the server), ``get_weights()``,
``set_weights()``, ``get_config()``/``from_config()``.
"""

from __future__ import annotations

import json

import numpy as np
import tensorflow as tf
import tf_keras

from optserve.client import keras_tensorflow, security
from optserve.client.client import Client, parse_address
from optserve.client.remote_job import (
    PulledValues,
    check_job_arguments,
    check_server_layout,
    check_unique_names,
    job_config,
    server_config,
)

__all__ = ["RemoteOptimizer"]

# Base-optimizer arguments a worker reports as attributes, as tf_keras does;
# the server applies them.
_BASE_ARGUMENTS = (
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
)
# tf_keras-only entries of get_config(): XLA for the local update, and a marker
# for deserialization. Neither means anything to the server.
_LOCAL_ONLY_CONFIG = ("jit_compile", "is_legacy_optimizer")


@tf_keras.saving.register_keras_serializable(package="optserve")
class RemoteOptimizer(tf_keras.optimizers.Optimizer):
    """A tf_keras optimizer that trains through an optserve parameter server.

    Args:
        optimizer: what the server runs: a tf_keras optimizer (e.g.
            `tf.keras.optimizers.Adam(0.01)` under `TF_USE_LEGACY_KERAS=1`), its
            `get_config()` with `"class_name"`, its `tf_keras.optimizers.serialize()`
            dict, or a name such as `"adam"`.
        address, model_id, num_workers, worker_index, mode, sync_timeout_s,
        timeout, tls, token: as for `optserve.client.RemoteOptimizer` (docs/keras.md).
        name: this optimizer's name; other keyword arguments override the
            wrapped optimizer's config (`learning_rate=0.1`).

    Variables are known on the server by their names without the `:0`
    suffix (`dense/kernel`), so every worker must name its layers alike.
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
        tls=None,
        token=None,
        name=None,
        **overrides,
    ):
        address = parse_address(address)
        tls = tls if tls is None or isinstance(tls, bool) else security.resolve_tls(tls)
        token = None if token is None else security.resolve_token(token)
        check_job_arguments(model_id, num_workers, worker_index, mode, sync_timeout_s, timeout)
        wrapped = _wrapped_optimizer(optimizer, overrides)
        super().__init__(
            name=name or wrapped.name,
            jit_compile=False,
            **{key: getattr(wrapped, key) for key in _BASE_ARGUMENTS},
        )
        self.address = address
        self.model_id = model_id
        self.num_workers = int(num_workers)
        self.worker_index = int(worker_index)
        self.mode = mode
        self.sync_timeout_s = float(sync_timeout_s)
        self.timeout = None if timeout is None else float(timeout)
        self._tls, self._token = tls, token
        # JSON text, not dicts: attribute containers would be wrapped by the tracker.
        self._wrapped_config_json = json.dumps(_plain_config(tf_keras.optimizers.serialize(wrapped)))
        self._server_config_json = json.dumps(
            server_config(type(wrapped).__name__, _without_local_only(wrapped.get_config()))
        )
        self._has_schedule = isinstance(wrapped._learning_rate, tf_keras.optimizers.schedules.LearningRateSchedule)
        self._learning_rate_value = self._next_learning_rate = float(tf.convert_to_tensor(wrapped.learning_rate))
        self._server_iterations = 0
        self._client = None
        self._variable_names = ()
        self._model_variables = self._no_dependency([])
        self._slot_variables = self._no_dependency([])  # [(variable name, slot name, tf.Variable)]
        self._pulled = self._no_dependency(PulledValues())

    # ------------------------------------------------------------------ configuration

    @property
    def wrapped_config(self):
        """The wrapped optimizer, as `tf_keras.optimizers.serialize()` gives it."""
        return json.loads(self._wrapped_config_json)

    def get_config(self):
        return job_config(self)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)

    @property
    def client(self):
        """The `optserve.client.Client` this optimizer talks through (created on first use)."""
        if self._client is None:
            self._client = Client(self.address, timeout=self.timeout, tls=self._tls, token=self._token)
        return self._client

    def close(self):
        """Close the connection to the server; the server keeps the model."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # ------------------------------------------------------------------ build

    @tf.autograph.experimental.do_not_convert
    def build(self, var_list):
        """Create the model on the server from `var_list`'s values, or join it and adopt its values."""
        if getattr(self, "_built", False):
            return
        with keras_tensorflow.eager_scope():
            self._build_on_server(list(var_list))

    def _build_on_server(self, variables):
        names = check_unique_names([_server_name(v) for v in variables], "their names")
        initial_values = {name: v.numpy() for name, v in zip(names, variables)}
        info = self.client.create_model(
            self.model_id,
            json.loads(self._server_config_json),
            initial_values,
            num_workers=self.num_workers,
            mode=self.mode,
            sync_timeout_s=self.sync_timeout_s,
        )
        check_server_layout(self.model_id, info, names, initial_values)
        weights = self.client.get_weights(self.model_id, include_variables=not info.created)
        if not info.created:
            for name, variable in zip(names, variables):
                variable.assign(weights.variables[name])
        for name, variable in zip(names, variables):
            self._pulled.note(name, variable.numpy())
        self._build_index_dict(variables)
        self._variable_names = tuple(names)
        self._model_variables[:] = variables
        for name in names:
            for slot, value in weights.slots.get(name, {}).items():
                mirror = tf.Variable(value, trainable=False, name=f"{name.replace('/', '_')}_{slot}")
                self._slot_variables.append((name, slot, mirror))
                self._variables.append(mirror)
        self._adopt(weights.iterations, weights.learning_rate)
        self._iterations.assign(self._server_iterations)
        self._built = True

    # ------------------------------------------------------------------ applying gradients

    # Talks to the server: AutoGraph (inside a user's tf.function) must not try to convert it.
    @tf.autograph.experimental.do_not_convert
    def apply_gradients(self, grads_and_vars, name=None, skip_gradients_aggregation=False, **kwargs):
        """Push `(gradient, variable)` pairs and take the new values: one round trip. Returns `iterations`.

        `skip_gradients_aggregation=True` (or Keras 2's
        `experimental_aggregate_gradients=False`) says the gradients are already
        summed across workers: the server applies them once per step as they are.
        """
        aggregated = bool(skip_gradients_aggregation) or not kwargs.pop("experimental_aggregate_gradients", True)
        if kwargs:
            raise TypeError(f"apply_gradients() got unexpected keyword arguments: {sorted(kwargs)}")
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        if not pairs:
            return self._iterations
        grads, variables = zip(*pairs)
        self.build(variables)
        names = [self._name_of(v) for v in variables]
        if keras_tensorflow.executing_eagerly():
            self._write_back(self._pulled.changed(self._variable_names, [v.numpy() for v in self._model_variables]))
            values = self._push_pull({n: keras_tensorflow.host_gradient(g) for n, g in zip(names, grads)}, aggregated)
            for variable, name in zip(self._model_variables, self._variable_names):
                variable.assign(values[name])
                self._pulled.note(name, values[name])
            self._iterations.assign(self._server_iterations)
        else:
            self._graph_step(list(zip(names, grads)), aggregated)
        self._apply_constraints()
        return self._iterations

    def _graph_step(self, named_grads, aggregated):
        dtypes = [v.dtype for v in self._model_variables] + [tf.int64]

        def host_step(host_grads, current_values):
            self._write_back(self._pulled.changed(self._variable_names, current_values))
            values = self._push_pull(host_grads, aggregated)
            for name in self._variable_names:
                self._pulled.note(name, values[name])
            return [values[name] for name in self._variable_names] + [np.int64(self._server_iterations)]

        current = [v.read_value() for v in self._model_variables]
        outputs = keras_tensorflow.graph_round_trip(named_grads, host_step, dtypes, current)
        for variable, value in zip(self._model_variables, outputs[:-1]):
            variable.assign(tf.reshape(value, variable.shape))
        self._iterations.assign(tf.reshape(outputs[-1], ()))

    def _apply_constraints(self):
        """tf_keras constrains a variable after each update; the server must continue from that value."""
        constrained = [(n, v) for n, v in zip(self._variable_names, self._model_variables) if v.constraint]
        if not constrained:
            return
        for _, variable in constrained:
            variable.assign(variable.constraint(variable))
        if keras_tensorflow.executing_eagerly():
            self._write_back({n: v.numpy() for n, v in constrained})
            return

        def write_back(values, _):
            self._write_back({n: np.asarray(a) for n, a in values.items()})
            return []

        keras_tensorflow.graph_round_trip([(n, v.read_value()) for n, v in constrained], write_back, [])

    def _write_back(self, changed):
        """Variables written outside the optimizer (set_weights, load_weights, ...) go to the server first."""
        if changed:
            self.client.set_weights(self.model_id, variables=changed)
            self._pulled.keep(changed)

    def _push_pull(self, grads, aggregated):
        result, values = self.client.push_pull(
            self.model_id, grads, worker_index=self.worker_index, aggregated=aggregated
        )
        missing = [name for name in self._variable_names if name not in values]
        if missing:
            raise RuntimeError(f"The server's answer for model {self.model_id!r} lacks the variables {missing}.")
        used = self._next_learning_rate
        self._adopt(result.iterations, result.learning_rate)
        # tf_keras reports the rate its last update used (for a schedule, evaluated
        # before that step), not the next one's as Keras 3 does.
        self._learning_rate_value = used
        return values

    def _adopt(self, iterations, learning_rate):
        self._server_iterations = int(iterations)
        self._next_learning_rate = float(learning_rate)
        if self._server_iterations == 0 or not self._has_schedule:
            self._learning_rate_value = self._next_learning_rate

    def _name_of(self, variable):
        key = self._var_key(variable)
        if key not in self._index_dict:
            raise KeyError(
                f"The variable {variable.name} was not given to the optimizer when it was built; "
                f"it knows {list(self._variable_names)}."
            )
        return self._variable_names[self._index_dict[key]]

    def finalize_variable_values(self, var_list):
        """With `use_ema`, the model variables take their moving averages, here and on the server."""
        if not self.use_ema or not getattr(self, "_built", False):
            return
        slots = self.client.get_weights(self.model_id).slots
        averages = {n: slots[n]["average"] for n in self._variable_names if "average" in slots.get(n, {})}
        known = {self._var_key(v): n for n, v in zip(self._variable_names, self._model_variables)}
        for variable in var_list:
            name = known.get(self._var_key(variable))
            if name in averages:
                variable.assign(averages[name])
        if averages:
            self.client.set_weights(self.model_id, variables=averages)

    # ------------------------------------------------------------------ state

    @property
    def learning_rate(self):
        """As in tf_keras: the rate, or with a schedule the rate the last update used."""
        return tf.constant(self._learning_rate_value, dtype=tf_keras.backend.floatx())

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        raise TypeError(
            "The learning rate of a RemoteOptimizer lives on the optserve server and cannot be set "
            "from the worker. Give the wrapped optimizer the rate or a "
            f"`tf.keras.optimizers.schedules.LearningRateSchedule` instead. Received: {learning_rate}"
        )

    @property
    def variables(self):
        """`[iterations, *slots]` as tf.Variables, brought up to date with the server first."""
        self._refresh()
        return list(self._variables)

    @property
    def weights(self):
        """Same as `variables`."""
        return self.variables

    def get_weights(self):
        """The server's optimizer state as NumPy arrays: `[iterations, *slots]`."""
        self._check_built("get_weights")
        weights = self.client.get_weights(self.model_id)
        self._adopt(weights.iterations, weights.learning_rate)
        self._iterations.assign(self._server_iterations)
        return weights.as_list()

    def set_weights(self, weights):
        """Overwrite the server's optimizer state from `[iterations, *slots]`; a wrong list changes nothing."""
        self._check_built("set_weights")
        state = self.client.set_weights_list(self.model_id, [np.asarray(w) for w in weights])
        self._adopt(state.iterations, state.learning_rate)
        self._refresh()

    def save_own_variables(self, store):
        """`model.save()` stores the server's optimizer state."""
        for index, value in enumerate(self.get_weights() if getattr(self, "_built", False) else []):
            store[str(index)] = value

    def load_own_variables(self, store):
        """Loading a model writes the saved optimizer state to the server."""
        if getattr(self, "_built", False) and len(store.keys()) == len(self._variables):
            self.set_weights([store[str(index)] for index in range(len(self._variables))])

    def _refresh(self):
        if not getattr(self, "_built", False) or not keras_tensorflow.executing_eagerly():
            return
        weights = self.client.get_weights(self.model_id)
        self._adopt(weights.iterations, weights.learning_rate)
        self._iterations.assign(self._server_iterations)
        for name, slot, mirror in self._slot_variables:
            mirror.assign(weights.slots[name][slot])

    def _check_built(self, method):
        if not getattr(self, "_built", False):
            raise ValueError(
                f"You are calling `{method}()` on an optimizer that has not yet been built. Please call "
                "`optimizer.build(trainable_variables)` to create the optimizer weights first."
            )

    def update_step(self, gradient, variable):
        raise NotImplementedError("A RemoteOptimizer's update runs on the optserve server.")


def _server_name(variable):
    name = variable.name
    return name[:-2] if name.endswith(":0") else name


def _without_local_only(config):
    return {key: value for key, value in config.items() if key not in _LOCAL_ONLY_CONFIG}


def _plain_config(config):
    return json.loads(json.dumps(config, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


def _wrapped_optimizer(optimizer, overrides):
    """A tf_keras optimizer instance from any accepted form, with `overrides` applied."""
    if isinstance(optimizer, RemoteOptimizer):
        raise ValueError("`optimizer` must be a plain tf_keras optimizer, not another RemoteOptimizer.")
    if isinstance(optimizer, str):
        instance = tf_keras.optimizers.get(optimizer)
    elif isinstance(optimizer, dict):
        config = dict(optimizer)
        if "class_name" not in config:
            raise ValueError(
                "`optimizer` given as a dict must have a 'class_name' (a `tf_keras.optimizers.serialize()` "
                f"result, or a get_config() with 'class_name' added). Received keys: {sorted(config)}"
            )
        if "config" not in config:
            config = {"class_name": config.pop("class_name"), "config": config}
        instance = tf_keras.optimizers.deserialize(config, use_legacy_optimizer=False)
    elif isinstance(optimizer, (tf_keras.optimizers.Optimizer, tf_keras.optimizers.legacy.Optimizer)):
        instance = optimizer
    else:
        raise TypeError(
            "`optimizer` must be a tf_keras optimizer, its config or a name such as 'adam'. "
            f"Received: optimizer={optimizer!r}"
        )
    if isinstance(instance, tf_keras.optimizers.legacy.Optimizer):
        raise ValueError(
            f"`tf.keras.optimizers.legacy.{type(instance).__name__}` is not supported: the legacy "
            "optimizers' configs and some of their updates differ from the server's. Use "
            f"`tf.keras.optimizers.{type(instance).__name__}` instead."
        )
    if type(instance).__module__.split(".")[0] != "tf_keras":
        raise ValueError(
            f"Only tf_keras's built-in optimizers can run on the server. Received: {type(instance).__name__}"
        )
    if overrides:
        config = instance.get_config()
        config.update(overrides)
        instance = type(instance).from_config(config)
    learning_rate = instance._learning_rate
    is_schedule = isinstance(learning_rate, tf_keras.optimizers.schedules.LearningRateSchedule)
    if callable(learning_rate) and not is_schedule and not isinstance(learning_rate, tf.Variable):
        raise ValueError(
            "The wrapped optimizer's `learning_rate` must be a float or a "
            "`tf.keras.optimizers.schedules.LearningRateSchedule` (the server evaluates it). "
            f"Received: learning_rate={learning_rate!r}"
        )
    return instance
