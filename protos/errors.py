"""The one error family of optserve, shared by the server and the clients.

Every class names its gRPC status code (``code``, a ``grpc.StatusCode`` member
name) and carries a message meant for a person plus ``details``: machine-readable
extras that travel as trailing metadata (``"current_step"`` becomes the key
``optserve-current-step``). The server raises these classes and
:func:`status_metadata` turns one into the metadata it aborts with; a client turns
a status back into the same class with :func:`error_from_status`. Those two are
the only places where codes and classes meet.

This module imports neither gRPC nor the server, so both sides can use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "METADATA_PREFIX",
    "AbortedError",
    "AlreadyExistsError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "OptserveError",
    "ResourceExhaustedError",
    "StepMismatchError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_from_status",
    "status_metadata",
]

# Trailing-metadata keys of error details start with this prefix;
# "optserve-current-step" becomes details["current_step"].
METADATA_PREFIX = "optserve-"


class OptserveError(Exception):
    """A request failed; ``code`` names its gRPC status, ``details`` the server's extras.

    ``code`` is the class's status code unless one is given (a status this family
    has no class for, such as ``UNKNOWN``, arrives as a plain ``OptserveError``).
    ``shard_index`` and ``address`` say which server answered, when a sharded
    client spoke to several (see :meth:`on_shard`).
    """

    code: str = "INTERNAL"

    def __init__(self, message: str, *legacy: Any, details: Mapping[str, Any] | None = None, code: str | None = None):
        if legacy:
            # The clients' former signature, (code, message[, details]), still works.
            message, details, code = _legacy_arguments(message, legacy, details)
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        if code is not None:
            self.code = code
        self.shard_index: int | None = None
        self.address: str | None = None

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message

    def __reduce__(self):  # pickling (multiprocessing) keeps the class, the code and the declared fields
        return _rebuild, (type(self), self.message, self.details, self.code, self.__dict__)

    def on_shard(self, index: int, address: str) -> OptserveError:
        """This error as reported by shard ``index`` (``address``): message prefixed, fields set."""
        if self.shard_index is not None:
            return self
        copy = _rebuild(
            type(self), f"shard {index} ({address}): {self.message}", self.details, self.code, self.__dict__
        )
        copy.shard_index, copy.address = index, address
        return copy


def _legacy_arguments(
    first: str, rest: tuple[Any, ...], details: Mapping[str, Any] | None
) -> tuple[str, Mapping[str, Any] | None, str]:
    if len(rest) > 2 or not (isinstance(first, str) and first.isupper() and isinstance(rest[0], str)):
        raise TypeError(
            "OptserveError takes (message, *, details=None, code=None), or the former "
            f"(code, message, details=None). Received: {(first, *rest)!r}"
        )
    return rest[0], rest[1] if len(rest) > 1 else details, first


def _rebuild(
    cls: type[OptserveError], message: str, details: Mapping[str, Any], code: str, state: Mapping[str, Any]
) -> OptserveError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    error.message, error.details, error.code = message, dict(details), code
    return error


class InvalidArgumentError(OptserveError, ValueError):
    code = "INVALID_ARGUMENT"


class NotFoundError(OptserveError, KeyError):
    code = "NOT_FOUND"


class AlreadyExistsError(OptserveError):
    code = "ALREADY_EXISTS"


class FailedPreconditionError(OptserveError):
    code = "FAILED_PRECONDITION"


class StepMismatchError(FailedPreconditionError):
    """A push named a step other than the model's current one.

    ``current_step`` is the server's step (also ``details["current_step"]``). A
    client adds what it sent (``model_id``, ``worker_index``, ``step``); it never
    adopts the server's step on its own: call ``Client.resync`` (or push with
    ``step=error.current_step``) to go on.
    """

    def __init__(self, message: str, *legacy: Any, details: Mapping[str, Any] | None = None, code: str | None = None):
        super().__init__(message, *legacy, details=details, code=code)
        self.current_step = int(self.details["current_step"])
        self.model_id: str | None = None
        self.worker_index: int | None = None
        self.step: int | None = None


class ResourceExhaustedError(OptserveError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(OptserveError, TimeoutError):
    code = "DEADLINE_EXCEEDED"


class AbortedError(DeadlineExceededError):
    """The server ended the call for a reason of its own: a synchronous step timed out or
    lost a worker, an upload stalled; ``details["reason"]`` says which. The caller's own
    deadline is DEADLINE_EXCEEDED instead; both are timeouts, so this is a
    DeadlineExceededError too."""

    code = "ABORTED"


class UnavailableError(OptserveError, ConnectionError):
    code = "UNAVAILABLE"


class UnauthenticatedError(OptserveError, PermissionError):
    code = "UNAUTHENTICATED"


# Status codes -> classes. Statuses not listed arrive as a plain OptserveError with their code.
_CLASS_BY_CODE: dict[str, type[OptserveError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "OUT_OF_RANGE": InvalidArgumentError,
    "NOT_FOUND": NotFoundError,
    "ALREADY_EXISTS": AlreadyExistsError,
    "FAILED_PRECONDITION": FailedPreconditionError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "ABORTED": AbortedError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "UNAVAILABLE": UnavailableError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "PERMISSION_DENIED": UnauthenticatedError,
}


def status_metadata(error: OptserveError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that carries ``error.details`` over the wire."""
    return tuple((METADATA_PREFIX + key.replace("_", "-"), str(value)) for key, value in error.details.items())


def details_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    details = {}
    for key, value in metadata or ():
        if key.startswith(METADATA_PREFIX):
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            details[key[len(METADATA_PREFIX) :].replace("-", "_")] = text
    return details


def error_from_status(
    code: str, message: str, metadata: Iterable[tuple[str, str | bytes]] | None = None
) -> OptserveError:
    """The error a status (code name, message, trailing metadata) stands for."""
    details = details_from_metadata(metadata)
    if code == "FAILED_PRECONDITION" and "current_step" in details:
        return StepMismatchError(message, details=details, code=code)
    cls = _CLASS_BY_CODE.get(code, OptserveError)
    return cls(message, details=details, code=None if cls.code == code else code)
