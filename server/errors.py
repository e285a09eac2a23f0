"""Domain exceptions of the engine and the server.

Each maps to exactly one gRPC status code; the servicer translates them in one
place (``optserve.server.servicer``). Messages say what was received and what is
allowed, because they reach the user verbatim.
"""
from __future__ import annotations


class OptserveError(Exception):
    """Base class; ``code`` names the gRPC status code (grpc.StatusCode member name)."""

    code = "INTERNAL"

    def __init__(self, message: str, *, details: dict | None = None):
        super().__init__(message)
        self.message = message
        # Machine-readable extras sent as trailing metadata (e.g. current_step).
        self.details = dict(details or {})


class InvalidArgumentError(OptserveError, ValueError):
    code = "INVALID_ARGUMENT"


class NotFoundError(OptserveError, KeyError):
    code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class AlreadyExistsError(OptserveError):
    code = "ALREADY_EXISTS"


class FailedPreconditionError(OptserveError):
    code = "FAILED_PRECONDITION"


class ResourceExhaustedError(OptserveError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(OptserveError):
    code = "DEADLINE_EXCEEDED"


class UnavailableError(OptserveError):
    code = "UNAVAILABLE"


class AbortedError(OptserveError):
    """The server ended the call for a reason of its own (a synchronous step timed out or lost a
    worker, an upload stalled); ``details["reason"]`` says which. Distinct from the caller's own
    deadline, which clients see as DEADLINE_EXCEEDED."""

    code = "ABORTED"
