"""Domain exceptions of the engine and the server.

They are the project's one error family (``optserve.protos.errors``), shared
with the clients: each class names exactly one gRPC status code, and the
servicer translates them in one place (``optserve.server.servicer``). Messages
say what was received and what is allowed, because they reach the user verbatim.
"""

from __future__ import annotations

from optserve.protos.errors import (
    AbortedError,
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OptserveError,
    ResourceExhaustedError,
    StepMismatchError,
    UnavailableError,
)

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "OptserveError",
    "ResourceExhaustedError",
    "StepMismatchError",
    "UnavailableError",
]
