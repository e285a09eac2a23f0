"""Backend helpers of the Keras 3 `RemoteOptimizer` (client/keras_optimizer.py).

What differs between Keras's backends lives here: which compilers must keep
away from code that talks to the server, how a variable's value reaches the
host, what cheaply says that a variable was written, and the mirror variables
whose reads fetch the server's optimizer state. Plus the config helpers that
give every backend the same serialized optimizer.
"""

from __future__ import annotations

import contextlib
import json
import uuid

import keras
import numpy as np
from keras import ops

from optserve.client.remote_job import check_unique_names

__all__ = [
    "tensorflow_helpers",
    "in_tf_graph",
    "eager_scope",
    "host_code",
    "mirror_class",
    "overwrite",
    "portable_config",
    "json_default",
    "initial_learning_rate",
    "variable_names",
    "to_numpy",
    "job_id",
    "change_token",
    "host_gradient",
    "refuse_traced",
    "cast_gradient",
    "deserialize_optimizer",
    "is_jax_sparse",
    "refuse_overwrite_with_gradient",
]


def tensorflow_helpers():
    """The TensorFlow helpers on the TensorFlow backend, else None (TensorFlow stays unimported)."""
    if keras.backend.backend() != "tensorflow":
        return None
    from optserve.client import keras_tensorflow

    return keras_tensorflow


def in_tf_graph():
    tf_helpers = tensorflow_helpers()
    return tf_helpers is not None and not tf_helpers.executing_eagerly()


def eager_scope():
    """Out of a `tf.function` being traced (building the optimizer there talks to the server)."""
    tf_helpers = tensorflow_helpers()
    return contextlib.nullcontext() if tf_helpers is None else tf_helpers.eager_scope()


def host_code(function):
    """Code that talks to the server: no graph compiler may try to convert it.

    With `jit_compile=True` on torch, TorchDynamo cannot trace gRPC calls; left
    to itself it would try, warn at every unsupported call, and break the graph
    there anyway: the round trip runs between compiled graphs. Inside a user's
    `@tf.function`, AutoGraph would convert every function the step calls, gRPC
    included, and warn about each; the graph parts here have no Python control
    flow on tensors, so they need no conversion.
    """
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return torch.compiler.disable(function, recursive=True)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.autograph.experimental.do_not_convert(function)
    return function


# --------------------------------------------------------------------------- mirror variables

_MIRROR_CLASSES: dict[type, type] = {}  # backend Variable class -> its mirror subclass


def mirror_class(base):
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

            def __repr__(self):
                self.value  # noqa: B018 - brings the value up to date before Keras prints it
                return super().__repr__()

        ServerStateVariable.__qualname__ = ServerStateVariable.__name__ = f"ServerState{base.__name__}"
        _MIRROR_CLASSES[base] = ServerStateVariable
    return _MIRROR_CLASSES[base]


def overwrite(mirror, value):
    mirror.assign(value)
    mirror._server_snapshot = mirror._value


# --------------------------------------------------------------------------- helpers


def portable_config(instance):
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
    return json.loads(json.dumps(config, default=json_default))


def json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def initial_learning_rate(instance):
    return float(to_numpy(instance.learning_rate))


def variable_names(variables):
    return check_unique_names([getattr(v, "path", None) or v.name for v in variables], "`variable.path`")


def to_numpy(value):
    if isinstance(value, keras.Variable):
        # The tensor, not the Variable: Variable.__array__ predates NumPy 2's `copy` argument.
        value = value.value
    return np.asarray(ops.convert_to_numpy(value))


def job_id(model_id, num_workers, optimizer_name):
    if model_id is not None:
        return model_id
    if num_workers > 1:
        raise ValueError(
            "With num_workers > 1, every worker must name the job with the same `model_id` "
            f"(e.g. model_id='my-run'). Received: model_id=None, num_workers={num_workers}"
        )
    return f"{optimizer_name}-{uuid.uuid4().hex[:12]}"


def change_token(variable):
    """Something that changes whenever `variable` is written, or None where no such thing is cheap.

    torch counts in-place writes on a tensor (`_version`); a JAX variable holds
    a new immutable array after every write. TensorFlow variables have neither:
    their values are compared.
    """
    backend = keras.backend.backend()
    if backend == "torch":
        return variable.value._version
    if backend == "jax":
        return id(variable._value)
    return None


def host_gradient(gradient):
    """A gradient as the client sends it; TensorFlow's IndexedSlices stay sparse."""
    tf_helpers = tensorflow_helpers()
    if tf_helpers is not None:
        return tf_helpers.host_gradient(gradient)
    return to_numpy(gradient)


def refuse_traced(grads):
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


def cast_gradient(gradient, dtype):
    """`gradient` in `dtype`, as Keras's update casts it to the variable's (sparse stays sparse).

    Done before the gradient leaves the worker: the server takes gradients of
    the variable's dtype only, and a float64 gradient of a float32 variable
    rounds here exactly as it does in Keras's `update_step`.
    """
    if gradient is None:
        return None
    tf_helpers = tensorflow_helpers()
    if tf_helpers is not None and tf_helpers.is_sparse(gradient):
        # Indices may be given as a Python tuple; the host call needs a tensor.
        return type(gradient)(
            cast_gradient(gradient.values, dtype), ops.convert_to_tensor(gradient.indices), gradient.dense_shape
        )
    if is_jax_sparse(gradient):
        from jax.experimental import sparse as jax_sparse

        if keras.backend.standardize_dtype(gradient.dtype) == keras.backend.standardize_dtype(dtype):
            return gradient
        return jax_sparse.BCOO((ops.cast(gradient.data, dtype), gradient.indices), shape=gradient.shape)
    if hasattr(gradient, "dtype") and keras.backend.standardize_dtype(gradient.dtype) == (
        keras.backend.standardize_dtype(dtype)
    ):
        return gradient
    return ops.cast(gradient, dtype)


def is_jax_sparse(gradient) -> bool:
    if keras.backend.backend() != "jax":
        return False
    from jax.experimental import sparse as jax_sparse

    return isinstance(gradient, jax_sparse.JAXSparse)


def refuse_overwrite_with_gradient(variables, where):
    """float8 training's `overwrite_with_gradient` variables take their gradient as their value, in Keras.

    RemoteOptimizer does that in an eager `apply`; elsewhere (inside a traced
    step, with gradient accumulation) it refuses at the first call rather than
    letting the server apply such a "gradient" (an amax history or a scale).
    """
    marked = [getattr(v, "path", None) or v.name for v in variables if getattr(v, "overwrite_with_gradient", False)]
    if marked:
        raise ValueError(
            f"RemoteOptimizer supports variables with `overwrite_with_gradient=True` (float8 training) only in "
            f"an eager `apply` without gradient accumulation, not {where}. Received such variables: {marked}. "
            "Train the float8 layers with a local Keras optimizer, call `apply` eagerly, or use another "
            "dtype policy for them."
        )


def deserialize_optimizer(config):
    """`keras.optimizers.deserialize(config)`, also for the built-ins it does not know.

    Keras 3.15's `deserialize` leaves some public optimizers (Lamb) out of its
    table and returns the class name as a string for them.
    """
    instance = keras.optimizers.deserialize(config)
    if isinstance(instance, keras.optimizers.Optimizer):
        return instance
    public = getattr(keras.optimizers, str(config.get("class_name")), None)
    if isinstance(public, type) and issubclass(public, keras.optimizers.Optimizer) and "config" in config:
        return public.from_config(dict(config["config"]))
    raise ValueError(f"Could not deserialize the optimizer {config.get('class_name')!r}. Received: {config!r}")
