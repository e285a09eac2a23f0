"""TensorFlow pieces shared by the Keras 3 and the tf_keras remote optimizers.

Keras's TensorFlow trainer traces the train step into a graph with
`tf.function`; a graph cannot talk gRPC. The round trip therefore runs as one
`tf.py_function`: a stateful host call, which TensorFlow runs exactly once per
step and in program order with the ops around it (the forward pass before it,
the variable assignments after it, the next step's reads after those). The
call is traced once with the train step, never per step.

Gradients of an `Embedding` arrive as `tf.IndexedSlices`; they cross the host
call as their indices and rows and go on the wire as an
`optserve.client.SparseGradient`, never densified on the worker.

This module imports TensorFlow; the Keras clients load it only on that backend.
"""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

# No public API says whether the graph being traced will be compiled by XLA
# (`tf.function(jit_compile=True)`); this helper has been in TensorFlow since 2.0.
from tensorflow.python.ops import control_flow_util

__all__ = [
    "XLA_MESSAGE",
    "executing_eagerly",
    "eager_scope",
    "refuse_xla",
    "is_sparse",
    "host_gradient",
    "graph_round_trip",
    "as_tf_error",
]

XLA_MESSAGE = (
    "A remote optimizer cannot run inside an XLA-compiled function (`jit_compile=True`): its "
    "round trip to the optserve server is a host call, which XLA cannot compile. Compile the "
    "model with `model.compile(..., jit_compile=False)` (Keras already chooses that on a machine "
    "without a GPU), or drop `jit_compile=True` from your own `tf.function`."
)


def executing_eagerly() -> bool:
    return tf.executing_eagerly()


def eager_scope():
    """Lifts code out of a `tf.function` being traced, so that it runs eagerly (e.g. `build`)."""
    if tf.executing_eagerly():
        return contextlib.nullcontext()
    return tf.init_scope()


def refuse_xla() -> None:
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        raise ValueError(XLA_MESSAGE)


def is_sparse(gradient) -> bool:
    return isinstance(gradient, tf.IndexedSlices)


def _sparse_gradient(indices, values):
    from optserve.client import SparseGradient

    return SparseGradient(np.asarray(indices), np.asarray(values))


def host_gradient(gradient):
    """An eager gradient as the client sends it: an ndarray, or a SparseGradient for IndexedSlices."""
    if is_sparse(gradient):
        return _sparse_gradient(gradient.indices.numpy(), gradient.values.numpy())
    if isinstance(gradient, tf.Tensor):
        return gradient.numpy()
    return np.asarray(gradient)


def graph_round_trip(named_gradients, push, output_dtypes, current_values=()):
    """One ordered host call inside the graph being traced.

    Args:
        named_gradients: `[(name, gradient)]`, dense tensors or `tf.IndexedSlices`.
        push: called on the host with `({name: ndarray | SparseGradient}, [ndarray])`:
            the gradients and `current_values` as arrays; returns one array per
            entry of `output_dtypes`.
        output_dtypes: the dtypes of what `push` returns.
        current_values: more tensors for the host (e.g. the variables' values).

    Returns the graph tensors of `push`'s results. An optserve error raised by
    `push` reaches the caller as the TensorFlow error of the same status code
    (e.g. `tf.errors.UnavailableError`), whose message is the optserve one.
    """
    refuse_xla()
    flat, layout = [], []
    for name, gradient in named_gradients:
        if is_sparse(gradient):
            layout.append((name, True))
            flat += [gradient.indices, gradient.values]
        else:
            layout.append((name, False))
            flat.append(gradient)

    count = len(flat)
    flat += list(current_values)

    # Plain Python on the host: AutoGraph would only try (and fail) to convert the gRPC calls.
    @tf.autograph.experimental.do_not_convert
    def host_call(*tensors):
        arrays = iter(t.numpy() for t in tensors[:count])
        grads = {}
        for name, sparse in layout:
            grads[name] = _sparse_gradient(next(arrays), next(arrays)) if sparse else next(arrays)
        try:
            return push(grads, [t.numpy() for t in tensors[count:]])
        except Exception as error:  # noqa: BLE001 - re-raised as TensorFlow's error of the same code
            failure = as_tf_error(error)
        # Raised outside the handler: TensorFlow turns an OpError with a chained
        # cause into an UnknownError, losing the code.
        raise failure

    return tf.py_function(host_call, flat, [tf.as_dtype(dtype) for dtype in output_dtypes])


def as_tf_error(error: Exception) -> Exception:
    """The TensorFlow error that carries `error` out of a host call with its code and message.

    TensorFlow keeps the class and the text of an OpError raised in a py_function;
    any other exception would become an UnknownError. An optserve error's gRPC
    status code names the TensorFlow class: NOT_FOUND -> `tf.errors.NotFoundError`.
    """
    if isinstance(error, tf.errors.OpError):
        return error
    code = getattr(error, "code", None)
    class_name = "".join(part.capitalize() for part in code.split("_")) + "Error" if isinstance(code, str) else ""
    error_class = getattr(tf.errors, class_name, tf.errors.UnknownError)
    return error_class(None, None, f"{_public_name(type(error))}: {error}")


def _public_name(error_type: type) -> str:
    """`optserve.client.NotFoundError` for the error family, where users import it from."""
    import optserve.client

    if getattr(optserve.client, error_type.__name__, None) is error_type:
        return f"optserve.client.{error_type.__name__}"
    return f"{error_type.__module__}.{error_type.__qualname__}"
