"""The optimizer state a Keras user reads and writes on a `RemoteOptimizer`: a mixin.

`iterations`, `learning_rate`, `variables`/`weights`, `get_weights()` /
`set_weights()` and the `.keras` file's optimizer entries all show, or change,
the server's state. The iteration counter and the slots are mirrored in Keras
variables that refresh themselves from the server when they are read.
"""

from __future__ import annotations

import json
import logging
import warnings
import weakref

import keras
import numpy as np
from keras import ops

# A StatelessScope supplies variable values itself: reads there must not go to the server.
from keras.src.backend.common.stateless_scope import in_stateless_scope

from optserve.client.client import FailedPreconditionError
from optserve.client.keras_support import (
    deserialize_optimizer,
    in_tf_graph,
    initial_learning_rate,
    mirror_class,
    overwrite,
    portable_config,
    to_numpy,
)

__all__ = ["ServerState"]

log = logging.getLogger("optserve.client.keras")


class ServerState:
    """Mixed into RemoteOptimizer before `keras.optimizers.Optimizer`: the state reads through to the server."""

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
        """Sets the server's rate for the next update, as Keras's `optimizer.learning_rate = ...` does.

        A float, or a new `LearningRateSchedule`; as in Keras, a float cannot
        replace a schedule. With several workers, worker 0's setting is the
        one sent (callbacks such as ReduceLROnPlateau run on every worker);
        every worker reads the server's rate after its next step.
        """
        schedule = isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule)
        self._rate_function = None
        if not schedule:
            if callable(learning_rate) and not isinstance(learning_rate, keras.Variable):
                # A plain function: called before each step (as Keras does), its value sent when it changes.
                self._rate_function = learning_rate
                self._drop_learning_rate_variable()
                learning_rate = learning_rate()
            learning_rate = float(to_numpy(learning_rate))
        if schedule:
            self._drop_learning_rate_variable()
        if not self.built:
            self._set_wrapped_learning_rate(learning_rate, schedule)
            return
        if self.worker_index != 0:
            if not self._warned_learning_rate_writer:
                log.warning(
                    "Model %r: worker %d does not send learning rates; worker 0 sets the rate, and "
                    "this worker reads the server's after each step.",
                    self.model_id,
                    self.worker_index,
                )
                self._warned_learning_rate_writer = True
            return
        value = keras.optimizers.schedules.serialize(learning_rate) if schedule else learning_rate
        try:
            state = self.client.set_weights(self.model_id, learning_rate=value)
        except FailedPreconditionError as error:
            raise TypeError(str(error)) from None
        self._adopt_state(state.iterations, state.learning_rate)

    @property
    def loss_scale_factor(self):
        return self.__dict__.get("_remote_loss_scale_factor")

    @loss_scale_factor.setter
    def loss_scale_factor(self, value):
        """Set before the job exists (MultiOptimizer sets its own on the optimizers it holds): sent with it.

        The server divides the gradients by the factor, so once the job exists a
        new factor would reach the worker's `scale_loss` only: refused.
        """
        if "_wrapped_config_json" not in self.__dict__:  # Keras's constructor sets it first
            self.__dict__["_remote_loss_scale_factor"] = value
            return
        if value == self.loss_scale_factor:
            return
        if self.built:
            raise ValueError(
                f"The `loss_scale_factor` of a RemoteOptimizer cannot change once its job exists on the server "
                f"(it divides the gradients there). Received: loss_scale_factor={value!r}, the job's is "
                f"{self.loss_scale_factor!r}. Set it before the optimizer is built."
            )
        wrapped = deserialize_optimizer(self.wrapped_config)
        config = wrapped.get_config()
        config["loss_scale_factor"] = value
        self._wrapped_config_json = json.dumps(portable_config(type(wrapped).from_config(config)))
        self.__dict__["_remote_loss_scale_factor"] = value

    def _set_wrapped_learning_rate(self, learning_rate, schedule):
        """Before the job exists: the wrapped optimizer is created with the new rate."""
        wrapped = deserialize_optimizer(self.wrapped_config)
        if schedule:
            wrapped_config = wrapped.get_config()
            wrapped_config["learning_rate"] = learning_rate
            wrapped = type(wrapped).from_config(wrapped_config)
        else:
            wrapped.learning_rate = learning_rate  # Keras's own check: a float cannot replace a schedule
        self._wrapped_config_json = json.dumps(portable_config(wrapped))
        self._learning_rate_value = initial_learning_rate(wrapped)

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
        """Same as `variables`: Keras 3's `[iterations, learning_rate (a float's), *slots]`, read from the server."""
        return self.variables

    def get_weights(self):
        """The server's optimizer state in tf.keras's layout: `[iterations, *slots]` (no learning rate)."""
        self._check_built("get_weights")
        if not self._variable_names:  # built on no variables: no job on the server
            return [np.asarray(self._server_iterations, dtype=self._iterations.dtype)]
        weights = self.client.get_weights(self.model_id)
        self._adopt_state(weights.iterations, weights.learning_rate)
        return weights.as_list()

    def set_weights(self, weights):
        """Overwrite the server's optimizer state from `[iterations, *slots]` or from `variables`' layout.

        tf.keras's `get_weights()` list, or Keras 3's `[iterations,
        learning_rate, *slots]` (what another optimizer's `variables` hold;
        recognised by its length when the rate is a float, and then its rate
        is set too). The count and every shape are checked first (ValueError
        naming the bad entry); a rejected list changes nothing.
        """
        self._check_built("set_weights")
        weights = [to_numpy(w) for w in weights]
        weights, learning_rate = self._without_learning_rate(weights)
        state = self.client.set_weights_list(self.model_id, weights)
        if not self._set_saved_learning_rate(learning_rate, state.learning_rate):
            self._adopt_state(state.iterations, state.learning_rate)
        self._slots_stale = True
        overwrite(self._iterations, np.asarray(self._server_iterations, dtype=self._iterations.dtype))
        return

    def _weights_length(self):
        """How many arrays `get_weights()` returns (tf.keras's layout, no learning rate)."""
        return len(self._slot_mirrors) + 1

    def _without_learning_rate(self, weights):
        """`weights` in tf.keras's layout, and the rate when they came in Keras 3's (`variables`') layout."""
        if self._learning_rate_mirror is not None and len(weights) == self._weights_length() + 1:
            return weights[:1] + weights[2:], float(np.asarray(weights[1]))
        return weights, None

    def _set_saved_learning_rate(self, learning_rate, server_rate):
        """Sets a rate that came with the weights when it differs from the server's; True if it did."""
        if learning_rate is None or learning_rate == float(server_rate):
            return False
        self.learning_rate = learning_rate
        return True

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
                f"Skipping variable loading for optimizer '{self.name}', because it has not been called/built yet.",
                stacklevel=2,
            )
            return
        count = self._weights_length()  # tf.keras's layout, as saved; Keras 3's has the rate too
        if len(store.keys()) == count + 1 and self._learning_rate_mirror is not None:
            count += 1
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

    def _replace_iterations_variable(self, float_rate):
        # Keras created a plain "iteration" variable; a mirror takes its place and position.
        # Keras 3 also tracks a float learning rate as a variable, right after it: so does this.
        plain = self._iterations
        self._untrack_variable(plain)
        with keras.name_scope(self.name, caller=self):
            mirror = self._add_mirror(np.zeros((), dtype=plain.dtype), "iteration")
            self._learning_rate_mirror = None
            if float_rate:
                self._learning_rate_mirror = self._add_mirror(
                    np.asarray(self._learning_rate_value, dtype=keras.backend.floatx()), "learning_rate"
                )
        self._iterations = mirror

    def _drop_learning_rate_variable(self):
        """A schedule replaced the float rate: as in Keras, the learning-rate variable is untracked."""
        if self._learning_rate_mirror is not None:
            self._untrack_variable(self._learning_rate_mirror)
            self._learning_rate_mirror = None

    def _add_mirror(self, value, name):
        variable_class = mirror_class(keras.Variable)
        mirror = variable_class(
            initializer=np.asarray(value),
            shape=np.shape(value),
            dtype=np.asarray(value).dtype.name,
            trainable=False,
            name=name,
        )
        mirror._owner = weakref.ref(self)
        mirror._server_snapshot = mirror._value
        self._track_variable(mirror)
        return mirror

    def _refresh_mirror(self, mirror):
        """Bring a mirror up to date with the server before its value is read."""
        if self._refreshing or in_stateless_scope() or in_tf_graph():
            return
        self._refreshing = True
        try:
            if mirror is self._iterations:
                self._refresh_iterations()
            elif mirror is self._learning_rate_mirror:
                self._refresh_learning_rate()
            elif self._slots_stale or mirror._value is not mirror._server_snapshot:
                self._refresh_slots()
        finally:
            self._refreshing = False

    def _refresh_iterations(self):
        mirror = self._iterations
        current = mirror._value
        # The counter comes with every step's answer; no round trip is needed.
        if current is None or current is not mirror._server_snapshot or int(current) != self._server_iterations:
            overwrite(mirror, np.asarray(self._server_iterations, dtype=mirror.dtype))

    def _refresh_learning_rate(self):
        # The rate comes with every step's answer, like the counter.
        mirror = self._learning_rate_mirror
        current = mirror._value
        if current is None or current is not mirror._server_snapshot or float(current) != self._learning_rate_value:
            overwrite(mirror, np.asarray(self._learning_rate_value, dtype=mirror.dtype))

    def _refresh_slots(self):
        weights = self.client.get_weights(self.model_id)
        self._adopt_state(weights.iterations, weights.learning_rate)
        for name, slot, mirror in self._slot_mirrors:
            overwrite(mirror, weights.slots[name][slot])
        self._slots_stale = False
        self._refresh_iterations()
