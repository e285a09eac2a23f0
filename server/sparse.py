"""Sparse gradients on the server: checked against the model, then made dense as Keras does.

Keras's TensorFlow backend hands an embedding's gradient to the optimizer as
``tf.IndexedSlices``; the optimizers' update arithmetic turns it into a dense
tensor (zeros with the rows scatter-added) and runs the ordinary dense update,
so every row's slots decay, touched or not. The server does that before the
push reaches the model, so a sparse push is applied (and summed with other
workers' pushes in a synchronous step) exactly like the dense gradient it
stands for; with distinct indices that is bit for bit what Keras computes
(tests/test_sparse.py compares with Keras on TensorFlow).

Repeated indices are summed first, as in the dense gradient and under Keras's
other backends. Keras's TensorFlow backend instead applies elementwise
operations such as ``square`` to each repeated row before the rows are summed,
so there the rows with repeated indices get other second moments
(``g1**2 + g2**2`` rather than ``(g1 + g2)**2``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from optserve.protos.tensors import SparseGradient
from optserve.server.errors import InvalidArgumentError, NotFoundError
from optserve.server.model import Model

__all__ = ["densify_gradients"]


def densify_gradients(
    model: Model, dense: Mapping[str, np.ndarray], sparse: Mapping[str, tuple[SparseGradient, tuple[int, ...]]]
) -> dict[str, np.ndarray]:
    """``dense`` plus every sparse gradient made dense; raises before anything is applied."""
    variables = {meta.name: meta for meta in model.spec.variables}
    for name, (gradient, declared_shape) in sparse.items():
        meta = variables.get(name)
        if meta is None:
            raise NotFoundError(
                f"Model {model.model_id!r} has no variable {name!r}; its variables are {sorted(variables)}."
            )
        if declared_shape and declared_shape != meta.shape:
            raise InvalidArgumentError(
                f"Sparse gradient for {name!r} declares shape {declared_shape}, but the variable has {meta.describe()}."
            )
        gradient.check_against(name, meta.shape, meta.dtype)
    merged = dict(dense)
    for name, (gradient, _) in sparse.items():
        meta = variables[name]
        merged[name] = gradient.densify(meta.shape, meta.dtype)
    return merged
