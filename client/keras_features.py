"""Keras optimizer features a `RemoteOptimizer` handles on the worker, around the server's update.

Weight-decay exclusions (resolved with Keras's rule, sent to the server as
exact names), `overwrite_with_gradient` variables (their gradient becomes their
value), and the small predicates `client/keras_optimizer.py` needs about its
inputs: callable learning rates, row-sparse JAX gradients, variables that hold
no value yet.
"""

from __future__ import annotations

import re

import keras
import numpy as np
from keras import ops

from optserve.client.keras_support import refuse_overwrite_with_gradient, to_numpy
from optserve.protos.tensors import SparseGradient

__all__ = ["KerasFeatures", "refuse_valueless", "is_schedule", "row_sparse", "plain_rate_function"]


class KerasFeatures:
    """Mixed into RemoteOptimizer before `keras.optimizers.Optimizer`."""

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Exclude variables from weight decay, as Keras does; call it before the optimizer is built.

        Both forms are resolved on the worker with Keras's own rule when the
        optimizer is built (`var_names` are regular expressions searched in
        `variable.name`), and the server is told exactly which variables not to
        decay. Workers joining the job must exclude the same variables.
        """
        if self.built:
            raise ValueError("`exclude_from_weight_decay()` can only be configured before the optimizer is built.")
        super().exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    def _excluded_names(self, variables, names):
        """The server names of the variables Keras's rule excludes from weight decay (anchored patterns)."""
        excluded = [name for name, v in zip(names, variables) if not self._use_weight_decay(v)]
        return ["^" + re.escape(name) + "$" for name in excluded]

    def _overwrite_with_gradients(self, grads, variables):
        """Keras's `overwrite_with_gradient` (float8 training): such a variable takes its gradient as its value.

        The new value reaches the server as a write outside the optimizer,
        before the push of the other gradients, which the server applies as usual.
        """
        marked = [i for i, v in enumerate(variables) if getattr(v, "overwrite_with_gradient", False)]
        if not marked:
            return grads, variables
        if self.gradient_accumulation_steps:
            refuse_overwrite_with_gradient(variables, "with `gradient_accumulation_steps`")
        for index in marked:
            variables[index].assign(ops.convert_to_tensor(to_numpy(grads[index]), dtype=variables[index].dtype))
        kept = [i for i in range(len(variables)) if i not in marked]
        # With no gradient left the push is empty: the server counts the step, as Keras does.
        return [grads[i] for i in kept], [variables[i] for i in kept]

    def _take_overwrites(self, host_grads):
        """Stateless steps: the `overwrite_with_gradient` variables' gradients leave the push as their new values."""
        overwrites = {}
        for name, variable in zip(self._variable_names, self._trainable_variables):
            if getattr(variable, "overwrite_with_gradient", False) and name in host_grads:
                gradient = host_grads.pop(name)
                if isinstance(gradient, SparseGradient):
                    gradient = gradient.densify(tuple(variable.shape))
                overwrites[name] = np.array(gradient, dtype=np.asarray(gradient).dtype)
        return overwrites  # an empty push left over still counts the step, as Keras's does


def refuse_valueless(variables, names, values):
    """TensorFlow: variables created inside the step being traced hold no value until it runs.

    That is a model without `keras.Input` whose first `fit`/`train_on_batch` step builds it;
    the job cannot be created from values that do not exist yet.
    """
    empty = [name for name, v in zip(names, variables) if tuple(np.shape(values[name])) != tuple(v.shape)]
    if empty:
        raise ValueError(
            f"RemoteOptimizer was built before the model's variables hold values: {empty} were created "
            "inside the train step being traced (a model without `keras.Input`, built by its first step). "
            "Build the model first: give it a `keras.Input(...)`, or call `model.build(input_shape)` or "
            "`model(x)` before `fit` / `train_on_batch`."
        )


def is_schedule(instance):
    return isinstance(instance._learning_rate, keras.optimizers.schedules.LearningRateSchedule)


def row_sparse(gradient):
    """Whether a BCOO gradient holds whole rows: one sparse (leading) dimension, the rest dense."""
    return gradient.n_batch == 0 and gradient.indices.shape[-1] == 1


def plain_rate_function(learning_rate):
    """A plain callable learning rate (not a schedule), which Keras calls at every step; else None."""
    if callable(learning_rate) and not isinstance(
        learning_rate, (keras.optimizers.schedules.LearningRateSchedule, keras.Variable)
    ):
        return learning_rate
    return None
