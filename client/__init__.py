"""optserve clients: the plain NumPy :class:`Client` and the Keras ``RemoteOptimizer``.

``RemoteOptimizer`` is loaded on first access, so ``import optserve.client``
never imports Keras (nor the server, nor CuPy).
"""
from __future__ import annotations

from optserve.client.client import (
    AlreadyExistsError,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    ModelInfo,
    NotFoundError,
    OptimizerState,
    OptimizerWeights,
    OptserveError,
    ResourceExhaustedError,
    StepMismatchError,
    StepResult,
    UnauthenticatedError,
    UnavailableError,
    VariableInfo,
)

__all__ = [
    "Client",
    "ModelInfo",
    "VariableInfo",
    "StepResult",
    "OptimizerState",
    "OptimizerWeights",
    "OptserveError",
    "InvalidArgumentError",
    "NotFoundError",
    "AlreadyExistsError",
    "FailedPreconditionError",
    "StepMismatchError",
    "DeadlineExceededError",
    "ResourceExhaustedError",
    "UnavailableError",
    "UnauthenticatedError",
]

_LAZY = {"RemoteOptimizer": "optserve.client.keras_optimizer"}


def __getattr__(name: str):
    # Keras is heavy and optional: import it only when RemoteOptimizer is asked for.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
