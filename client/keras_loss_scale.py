"""`RemoteOptimizer(keras.optimizers.LossScaleOptimizer(...))`: dynamic loss scaling on the server.

The server runs Keras's LossScaleOptimizer: it keeps the scale and its growth
counter, unscales the gradients, and skips (and shrinks the scale for) a step
whose gradients are not finite. The worker needs the scale before each step,
to multiply its loss (`scale_loss`, which Keras's trainers call): every step's
answer carries the server's scalars, and two mirror variables, `step_counter`
and `dynamic_scale`, hold them, as Keras's LossScaleOptimizer's variables do.

* Eagerly (torch, TensorFlow eager, JAX `run_eagerly`), a mirror read
  refreshes itself from the last answer: no extra round trip.
* In a `tf.function` (TensorFlow `fit`), the host call of the step writes the
  TensorFlow variables, so the next step's graph reads the new scale.
* Under JAX's compiled train step, the optimizer variables are threaded
  through the step as values: `stateless_apply` returns the new scale and
  counter in their places (a second ordered host call reads them), and the
  trainer's `scale_loss` reads the threaded value.

`variables` and `get_weights()` are `[iterations, *slots, step_counter,
dynamic_scale]`; saving a model keeps all of them and loading writes them back
to the server in one request.

This module imports Keras; `client/keras_classes.py` mixes `RemoteLossScaling`
into the remote subclass for `LossScaleOptimizer`.
"""

from __future__ import annotations

import json

import keras
import numpy as np
from keras import ops
from keras.src.utils import tracking

from optserve.client.arguments import slots_from_list
from optserve.client.keras_support import eager_scope, host_code, in_tf_graph, overwrite, tensorflow_helpers, to_numpy

__all__ = ["RemoteLossScaling", "STEP_COUNTER", "DYNAMIC_SCALE", "allow_eager_jax_loss_scaling"]

# The server's names for the two scalars (server/optimizers/loss_scale_optimizer.py), Keras's variable names.
STEP_COUNTER = "step_counter"
DYNAMIC_SCALE = "dynamic_scale"
_DEFAULT_INITIAL_SCALE = 2.0**15
_DEFAULT_GROWTH_STEPS = 2000
_COUNTER_DTYPE = "int64"  # Keras's "int" variables
_SCALE_DTYPE = "float32"


class RemoteLossScaling:
    """Mixed in before `RemoteOptimizer`: the LossScaleOptimizer's own state, mirrored from the server."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.wrapped_config["config"]
        inner = config.get("inner_optimizer")
        if isinstance(inner, dict):
            config["inner_optimizer"] = _portable_inner(inner)
            self._wrapped_config_json = json.dumps({**self.wrapped_config, "config": config})
        self.initial_scale = config.get("initial_scale", _DEFAULT_INITIAL_SCALE)
        self.dynamic_growth_steps = config.get("dynamic_growth_steps", _DEFAULT_GROWTH_STEPS)
        self._scale_value = float(np.float32(self.initial_scale))
        self._counter_value = 0
        self._scalars_version = 0
        self._inner_instance = None

    # ------------------------------------------------------------------ Keras's LossScaleOptimizer attributes

    @property
    def inner_optimizer(self):
        """The wrapped optimizer's configuration as a local, unbuilt Keras optimizer (the server runs it)."""
        if self._inner_instance is None:
            self._inner_instance = keras.optimizers.deserialize(self.wrapped_config["config"]["inner_optimizer"])
        return self._inner_instance

    @property
    def variables(self):
        # Keras's LossScaleOptimizer adds its inner optimizer's variables; here the
        # slots are this optimizer's own mirrors, so the base class's list is the one.
        for klass in type(self).__mro__:
            if klass in (RemoteLossScaling, keras.optimizers.LossScaleOptimizer):
                continue
            if "variables" in vars(klass):
                return vars(klass)["variables"].__get__(self, type(self))
        raise AttributeError("variables")

    def _server_optimizer_config(self):
        config = super()._server_optimizer_config()
        inner = config["config"].get("inner_optimizer")
        if isinstance(inner, dict) and isinstance(inner.get("config"), dict):
            inner["config"].pop("name", None)  # instance names differ between workers
        return config

    def _set_wrapped_learning_rate(self, learning_rate, schedule):
        """Before the job exists: the inner optimizer is created with the new rate."""
        config = self.wrapped_config
        inner = keras.optimizers.deserialize(config["config"]["inner_optimizer"])
        if schedule:
            inner_config = inner.get_config()
            inner_config["learning_rate"] = learning_rate
            inner = type(inner).from_config(inner_config)
        else:
            inner.learning_rate = learning_rate  # Keras's own check: a float cannot replace a schedule
        config["config"]["inner_optimizer"] = _portable_inner(keras.optimizers.serialize(inner))
        self._wrapped_config_json = json.dumps(config)
        self._inner_instance = None
        self._learning_rate_value = float(to_numpy(inner.learning_rate))

    # ------------------------------------------------------------------ build

    @tracking.no_automatic_dependency_tracking
    @host_code
    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        with eager_scope():
            self._adopt_scalars(self.client.get_weights(self.model_id).scalars)
            with keras.name_scope(self.name, caller=self):
                self.step_counter = self._add_mirror(np.asarray(self._counter_value, _COUNTER_DTYPE), STEP_COUNTER)
                self.dynamic_scale = self._add_mirror(np.asarray(self._scale_value, _SCALE_DTYPE), DYNAMIC_SCALE)
            for mirror in self._scale_mirrors():
                mirror._scalars_version = self._scalars_version

    def _scale_mirrors(self):
        found = [self.__dict__.get(STEP_COUNTER), self.__dict__.get(DYNAMIC_SCALE)]
        return [mirror for mirror in found if mirror is not None]

    # ------------------------------------------------------------------ the server's scalars

    def _adopt_scalars(self, scalars):
        if DYNAMIC_SCALE not in scalars:
            return
        self._scale_value = float(np.float32(scalars[DYNAMIC_SCALE]))
        self._counter_value = int(scalars.get(STEP_COUNTER, 0))
        self._scalars_version += 1

    def _adopt_step_result(self, result):
        """After every step: the scale and counter the server now holds."""
        super()._adopt_step_result(result)
        self._adopt_scalars(result.scalars)
        if tensorflow_helpers() is not None and not in_tf_graph():
            # Eager, or the host call of a traced step: the next graph reads the variables.
            self._write_scale_mirrors()

    def _write_scale_mirrors(self):
        values = {
            STEP_COUNTER: np.asarray(self._counter_value, _COUNTER_DTYPE),
            DYNAMIC_SCALE: np.asarray(self._scale_value, _SCALE_DTYPE),
        }
        for name in (STEP_COUNTER, DYNAMIC_SCALE):
            mirror = self.__dict__.get(name)
            if mirror is not None:
                overwrite(mirror, values[name])
                mirror._scalars_version = self._scalars_version

    def _refresh_mirror(self, mirror):
        if not any(mirror is own for own in self._scale_mirrors()):
            return super()._refresh_mirror(mirror)
        if self._refreshing or _in_stateless_scope() or in_tf_graph():
            return None
        stale = mirror._value is not mirror._server_snapshot
        if stale or getattr(mirror, "_scalars_version", None) != self._scalars_version:
            self._refreshing = True
            try:
                self._write_scale_mirrors()
            finally:
                self._refreshing = False
        return None

    # ------------------------------------------------------------------ TensorFlow's traced step

    def _graph_apply(self, named_grads, aggregated):
        """In a `tf.function`: after the step's host call, the mirrors take the new scalars in the graph.

        The host call writes them too, but a graph does not know it did; assigning
        them here orders the write before any later read, in a `steps_per_execution`
        loop as well.
        """
        super()._graph_apply(named_grads, aggregated)
        import tensorflow as tf

        mirrors = (self.step_counter, self.dynamic_scale)

        @tf.autograph.experimental.do_not_convert
        def read():
            return [
                np.asarray(self._counter_value, mirrors[0].dtype),
                np.asarray(self._scale_value, mirrors[1].dtype),
            ]

        values = tf.py_function(read, [], [tf.as_dtype(mirror.dtype) for mirror in mirrors])
        for mirror, value in zip(mirrors, values):
            mirror.assign(tf.reshape(value, ()))

    # ------------------------------------------------------------------ JAX's stateless step

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        new_values, new_optimizer_variables = super().stateless_apply(optimizer_variables, grads, trainable_variables)
        positions = [self._variable_position(mirror) for mirror in (self.step_counter, self.dynamic_scale)]
        if keras.backend.backend() == "jax":
            counter, scale = _jax_host_scalars(self)
        else:
            counter = ops.convert_to_tensor(self._counter_value, dtype=self.step_counter.dtype)
            scale = ops.convert_to_tensor(self._scale_value, dtype=self.dynamic_scale.dtype)
        new_optimizer_variables = list(new_optimizer_variables)
        new_optimizer_variables[positions[0]] = counter
        new_optimizer_variables[positions[1]] = scale
        return new_values, new_optimizer_variables

    def _variable_position(self, mirror):
        for index, variable in enumerate(self.variables):
            if variable is mirror:
                return index
        raise RuntimeError(f"The mirror {mirror.name!r} is not among the optimizer's variables.")

    # ------------------------------------------------------------------ weights: [iterations, *slots, counter, scale]

    def _weights_length(self):
        return super()._weights_length() + 2

    def get_weights(self):
        """The server's state: `[iterations, *slots, step_counter, dynamic_scale]`."""
        self._check_built("get_weights")
        weights = self.client.get_weights(self.model_id)
        self._adopt_state(weights.iterations, weights.learning_rate)
        self._adopt_scalars(weights.scalars)
        return [
            *weights.as_list(),
            np.asarray(self._counter_value, _COUNTER_DTYPE),
            np.asarray(self._scale_value, _SCALE_DTYPE),
        ]

    def set_weights(self, weights):
        """Overwrite the server's state from `[iterations, *slots, step_counter, dynamic_scale]`, in one request."""
        self._check_built("set_weights")
        weights, learning_rate = self._without_learning_rate([to_numpy(w) for w in weights])
        if len(weights) < 3:
            raise ValueError(
                "A remote LossScaleOptimizer's weights are [iterations, *slots, step_counter, dynamic_scale]. "
                f"Received a list of {len(weights)} arrays."
            )
        *state, counter, scale = weights
        layout = self.client.get_weights(self.model_id)
        slots = slots_from_list(self.model_id, state, layout)
        scalars = {STEP_COUNTER: float(np.asarray(counter).reshape(-1)[0]), DYNAMIC_SCALE: float(np.asarray(scale))}
        change = self.client.set_weights(
            self.model_id, slots=slots, iterations=int(np.asarray(state[0]).reshape(-1)[0]), scalars=scalars
        )
        if not self._set_saved_learning_rate(learning_rate, change.learning_rate):
            self._adopt_state(change.iterations, change.learning_rate)
        self._adopt_scalars(change.scalars if DYNAMIC_SCALE in change.scalars else scalars)
        self._slots_stale = True
        overwrite(self._iterations, np.asarray(self._server_iterations, dtype=self._iterations.dtype))
        self._write_scale_mirrors()


def _jax_host_scalars(optimizer):
    """The scale and counter as of the step's host call before this one (ordered: it has run)."""
    import jax
    from jax.experimental import io_callback

    # int64 is int32 in JAX unless x64 is enabled (Keras's JAX variables hold what JAX gives).
    counter_dtype = jax.dtypes.canonicalize_dtype(optimizer.step_counter.dtype)
    scale_dtype = jax.dtypes.canonicalize_dtype(optimizer.dynamic_scale.dtype)

    def read():
        return (
            np.asarray(optimizer._counter_value, counter_dtype),
            np.asarray(optimizer._scale_value, scale_dtype),
        )

    types = (jax.ShapeDtypeStruct((), counter_dtype), jax.ShapeDtypeStruct((), scale_dtype))
    return io_callback(read, types, ordered=True)


def _in_stateless_scope():
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    return in_stateless_scope()


def _portable_inner(config):
    """The inner optimizer's serialized config under its public module, the same on every backend."""
    from optserve.client.keras_classes import public_class

    class_name = config.get("class_name")
    public = getattr(keras.optimizers, class_name, None) if isinstance(class_name, str) else None
    if isinstance(public, type) and public_class(public) is public:
        config = {**config, "module": "keras.optimizers", "registered_name": None}
    return config


# --------------------------------------------------------------------------- LossScaleOptimizer(RemoteOptimizer)


def allow_eager_jax_loss_scaling():
    """Lets `keras.optimizers.LossScaleOptimizer(RemoteOptimizer(...)).apply()` run eagerly on JAX.

    Keras's LossScaleOptimizer.apply chooses between its finite and non-finite
    branches with `ops.cond`, which on JAX is `jax.lax.cond`: both branches
    are traced, so the inner optimizer's `apply` and the scale's assignments run
    on tracers (Keras's own test skips that case: "LossScaleOptimizer must use
    stateless_apply with JAX"). When the inner optimizer is a RemoteOptimizer
    and the gradients are concrete, the same method runs under
    `jax.disable_jit()`, where `lax.cond` calls the one branch its concrete
    predicate picks, as the other backends do. Every other call is Keras's,
    unchanged; `model.fit` uses `stateless_apply`, which this does not touch.
    """
    if keras.backend.backend() != "jax":
        return
    loss_scale_class = keras.optimizers.LossScaleOptimizer
    original = loss_scale_class._common_apply
    if getattr(original, "_optserve_eager_jax", False):
        return

    def _common_apply(self, grads, trainable_variables=None):
        if _wraps_remote_optimizer(self) and not _any_tracer(grads):
            import jax

            with jax.disable_jit():
                return original(self, grads, trainable_variables)
        return original(self, grads, trainable_variables)

    _common_apply._optserve_eager_jax = True
    _common_apply.__doc__ = original.__doc__
    loss_scale_class._common_apply = _common_apply


def _wraps_remote_optimizer(loss_scale_optimizer):
    from optserve.client.keras_optimizer import RemoteOptimizer

    return isinstance(getattr(loss_scale_optimizer, "inner_optimizer", None), RemoteOptimizer)


def _any_tracer(values):
    import jax

    return any(isinstance(value, jax.core.Tracer) for value in values if value is not None)
