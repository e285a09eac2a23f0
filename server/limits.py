"""What one server accepts: request bounds, memory budgets and concurrency limits.

Every bound here is checked before the server allocates anything for a request,
so that no single client can stall or exhaust the server for the others:

- *bounds* (``Limits.max_*``): sizes and values a request may carry; a request
  beyond one is refused with INVALID_ARGUMENT.
- *memory*: the state of every model (variables, optimizer slots, scratch and
  the merge buffer of a synchronous step) must fit ``max_memory`` and each model
  ``max_model_bytes``. A CreateModel reserves each variable's state when the
  variable's first chunk (which carries its shape) arrives, before receiving or
  allocating it; one that does not fit is refused with RESOURCE_EXHAUSTED.
- *in flight*: tensors being received (or held by a parked push) share
  ``max_inflight_bytes``; an upload waits for room (its stream is not read
  meanwhile, so gRPC flow control holds the sender back) up to
  ``stream_idle_timeout_s``, then is refused with RESOURCE_EXHAUSTED.
- *streams*: ``max_streams`` calls of the ParameterServer service at once on the
  whole server (beyond: RESOURCE_EXHAUSTED), ``max_streams_per_connection`` on one
  connection (HTTP/2 streams beyond it wait in the client, or are refused with
  UNAVAILABLE, safe to retry); health checks are not counted.
- *idle uploads*: a request stream that sends nothing for ``stream_idle_timeout_s``
  is dropped with ABORTED.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import re
from collections.abc import AsyncIterator, Iterable

from optserve.server.errors import AbortedError, InvalidArgumentError, ResourceExhaustedError
from optserve.server.quotas import PrincipalAccount, PrincipalQuotas

log = logging.getLogger(__name__)

# Steps and iteration counters stay far below int64 overflow: 2**53 steps is
# 285 years at a million steps a second, and every counter stays exact in a double.
MAX_STEP = 1 << 53
# Status messages and trailing metadata together must stay well under gRPC's
# default 8-16 KiB limit on a response's headers, or the client sees
# "Stream removed" instead of the status.
MAX_STATUS_MESSAGE_CHARS = 2048
MAX_METADATA_VALUE_CHARS = 1024
MAX_METADATA_ENTRIES = 16
# A ListModels answer (one page) stays under gRPC's default 4 MiB receive limit.
DEFAULT_MAX_LIST_BYTES = 3 << 20

REASON_KEY = "reason"  # trailing metadata "optserve-reason" of an ABORTED status
REASON_SYNC_TIMEOUT = "sync-timeout"
REASON_WORKER_LOST = "worker-lost"
REASON_IDLE_STREAM = "idle-stream"


def physical_memory_bytes() -> int | None:
    """The memory this process may use: the cgroup limit when there is one, else physical memory."""
    candidates = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as file:
                text = file.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            candidates.append(int(text))
    try:
        candidates.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX hosts
        pass
    return min(candidates) if candidates else None


def _default_memory() -> int:
    total = physical_memory_bytes()
    # Model state gets 3/4 of the machine; the rest is for requests in flight and the process itself.
    return (total * 3 // 4) if total else 16 << 30


def _default_inflight() -> int:
    total = physical_memory_bytes()
    return max(64 << 20, total // 4) if total else 4 << 30


_OPTIONAL_LIMITS = ("max_model_bytes", "max_models_per_principal", "max_memory_per_principal")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds and budgets of one server (``optserve serve --help`` names the flags)."""

    max_workers: int = 4096  # num_workers of a model
    max_sync_timeout_s: float = 86400.0  # a model's sync_timeout_s (and the server default)
    max_step: int = MAX_STEP  # step / iterations a request may set or push
    max_config_bytes: int = 64 << 10  # optimizer_config_json
    max_config_depth: int = 32  # nesting of optimizer_config_json
    max_name_bytes: int = 1024  # a variable or slot name (UTF-8)
    max_variables: int = 16384  # variables of one model
    max_dims: int = 32  # dimensions of one tensor
    max_elements: int = 1 << 40  # elements of one tensor (zero-sized dimensions ignored)
    max_models: int = 1024  # models on the server
    max_memory: int = dataclasses.field(default_factory=_default_memory)  # state of all models, bytes
    max_model_bytes: int | None = None  # state of one model; None: max_memory
    # Quotas of each principal (with --auth-tokens; a token-file line may set its own); None: none.
    max_models_per_principal: int | None = None
    max_memory_per_principal: int | None = None
    max_inflight_bytes: int = dataclasses.field(default_factory=_default_inflight)  # tensors being received
    max_streams: int = 8192  # concurrent ParameterServer calls, whole server
    max_streams_per_connection: int = 256  # concurrent calls on one connection (HTTP/2 streams)
    stream_idle_timeout_s: float = 60.0  # a request stream sending nothing this long is dropped
    max_list_bytes: int = DEFAULT_MAX_LIST_BYTES  # one ListModels answer
    # One received message. Clients send tensors in 1 MiB batches, so messages are small
    # unless many small tensors with long names share one; gRPC refuses a larger message
    # with RESOURCE_EXHAUSTED before it is handed to the server.
    max_message_bytes: int = 8 << 20

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name in _OPTIONAL_LIMITS:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not value > 0
                or not math.isfinite(value)
            ):
                raise InvalidArgumentError(
                    f"`{field.name}` must be a finite number > 0. Received: {field.name}={value!r}"
                )

    def replace(self, **changes) -> Limits:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# ------------------------------------------------------------------ bounds


def check_num_workers(num_workers: int, limits: Limits) -> int:
    """``num_workers`` of a spec; 0 (the proto3 default) means one worker."""
    if num_workers == 0:
        return 1
    if not 1 <= num_workers <= limits.max_workers:
        raise InvalidArgumentError(
            f"`num_workers` must be in [1, {limits.max_workers}] (0: one worker). Received: num_workers="
            f"{num_workers}. A server started with a larger --max-workers takes more."
        )
    return num_workers


def check_sync_timeout(sync_timeout_s: float, limits: Limits) -> float:
    """``sync_timeout_s`` of a spec: 0 (the server default) or finite, in (0, max_sync_timeout_s]."""
    if sync_timeout_s == 0:
        return 0.0
    if not (math.isfinite(sync_timeout_s) and 0 < sync_timeout_s <= limits.max_sync_timeout_s):
        raise InvalidArgumentError(
            f"`sync_timeout_s` must be 0 (the server default) or a finite number of seconds in (0, "
            f"{limits.max_sync_timeout_s:g}]. Received: sync_timeout_s={sync_timeout_s}"
        )
    return float(sync_timeout_s)


def check_counter(field: str, value: int, limits: Limits) -> int:
    if not 0 <= value <= limits.max_step:
        raise InvalidArgumentError(f"`{field}` must be >= 0 and at most {limits.max_step}. Received: {field}={value}")
    return value


_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def check_config_text(text: str, limits: Limits) -> str:
    """Size and nesting of ``optimizer_config_json``, checked before it is parsed."""
    if len(text) > limits.max_config_bytes or len(text.encode("utf-8", "surrogatepass")) > limits.max_config_bytes:
        raise InvalidArgumentError(
            f"`optimizer_config_json` must be at most {limits.max_config_bytes} bytes. Received: "
            f"{len(text.encode('utf-8', 'surrogatepass'))} bytes. Keras optimizer configs take a few hundred."
        )
    depth = deepest = 0
    for token in _JSON_TOKENS.finditer(text):
        symbol = token.group()
        if symbol in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif symbol in "]}":
            depth -= 1
    if deepest > limits.max_config_depth:
        raise InvalidArgumentError(
            f"`optimizer_config_json` must nest at most {limits.max_config_depth} levels deep. "
            f"Received: {deepest} levels."
        )
    return text


def check_name(name: str, what: str, limits: Limits) -> str:
    if len(name) > limits.max_name_bytes or len(name.encode("utf-8", "surrogatepass")) > limits.max_name_bytes:
        raise InvalidArgumentError(
            f"A {what} name must be at most {limits.max_name_bytes} bytes. Received a name of "
            f"{len(name.encode('utf-8', 'surrogatepass'))} bytes starting {name[:40]!r}."
        )
    return name


def check_shape(label: str, shape: Iterable[int], limits: Limits) -> tuple[int, ...]:
    """A tensor's shape: dimensions, each >= 0, and the element count, before anything is allocated."""
    shape = tuple(int(d) for d in shape)
    if len(shape) > limits.max_dims:
        raise InvalidArgumentError(
            f"Tensor {label[:100]!r} has {len(shape)} dimensions; at most {limits.max_dims} are allowed."
        )
    if any(d < 0 for d in shape):
        raise InvalidArgumentError(f"Tensor {label[:100]!r} has a negative dimension in shape {shape}.")
    # Python integers, and zero-sized dimensions ignored: [0, 2**62, 2**62] is no smaller than [2**62, 2**62].
    elements = math.prod(max(d, 1) for d in shape)
    if elements > limits.max_elements:
        raise InvalidArgumentError(
            f"Tensor {label[:100]!r} of shape {shape} would have {elements} elements; at most "
            f"{limits.max_elements} are allowed."
        )
    return shape


# ------------------------------------------------------------------ statuses


def bounded_text(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"... ({len(text) - limit} more characters)"


def bounded_status(message: str, metadata: Iterable[tuple[str, str]]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A status message and trailing metadata cut to sizes every gRPC client receives."""
    entries = list(metadata)[:MAX_METADATA_ENTRIES]
    return (
        bounded_text(message, MAX_STATUS_MESSAGE_CHARS),
        tuple((key, bounded_text(value, MAX_METADATA_VALUE_CHARS)) for key, value in entries),
    )


def worker_list(workers: Iterable[int]) -> str:
    """Workers as compact ranges ("0-2999,3001"), for trailing metadata."""
    workers = sorted(set(workers))
    parts, start = [], None
    for i, w in enumerate(workers):
        if start is None:
            start = w
        if i + 1 == len(workers) or workers[i + 1] != w + 1:
            parts.append(str(start) if start == w else f"{start}-{w}")
            start = None
    return ",".join(parts)


# ------------------------------------------------------------------ budgets


class ByteBudget:
    """Bytes shared by many holders; use on one event loop."""

    def __init__(self, capacity: int, what: str, flag: str):
        self.capacity = int(capacity)
        self.used = 0
        self.what = what
        self.flag = flag
        self._freed: asyncio.Condition | None = None

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def take(self, nbytes: int, force: bool = False) -> None:
        """Take ``nbytes`` now or raise RESOURCE_EXHAUSTED (``force``: take it regardless)."""
        if not force and self.used + nbytes > self.capacity:
            raise ResourceExhaustedError(
                f"{self.what} would exceed the server's budget: {nbytes} more bytes needed, {self.free} of "
                f"{self.capacity} free. Free some (DeleteModel), or start the server with a larger {self.flag}."
            )
        self.used += nbytes

    async def wait_take(self, nbytes: int, timeout_s: float) -> None:
        """Take ``nbytes`` once others gave enough back, waiting at most ``timeout_s``."""
        if nbytes > self.capacity:
            self.take(nbytes)  # can never fit: refuse now
        if self.used + nbytes <= self.capacity:
            self.used += nbytes
            return
        if self._freed is None:
            self._freed = asyncio.Condition()
        try:
            async with self._freed:
                await asyncio.wait_for(self._freed.wait_for(lambda: self.used + nbytes <= self.capacity), timeout_s)
        except asyncio.TimeoutError:
            raise ResourceExhaustedError(
                f"{self.what} waited {timeout_s:g} s for {nbytes} bytes of the server's budget ({self.free} of "
                f"{self.capacity} free). Retry later, send smaller requests, or start the server with a larger "
                f"{self.flag}."
            ) from None
        self.used += nbytes

    def give(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)
        if self._freed is not None and nbytes:
            asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        freed = self._freed
        if freed is None:
            return
        async with freed:
            freed.notify_all()


class Reservation:
    """Bytes one holder took from a budget; ``release()`` gives them all back (idempotent).

    ``owner``: the model's claim on its principal's quotas (``optserve.server.quotas``),
    charged and released with the bytes.
    """

    def __init__(self, budget: ByteBudget, owner: PrincipalAccount | None = None):
        self._budget = budget
        self.nbytes = 0
        self.owner = owner
        self.transferred = False  # handed to another owner (a model being built), who releases it

    def take(self, nbytes: int, cap: int | None = None, what: str = "", force: bool = False) -> None:
        if cap is not None and not force and self.nbytes + nbytes > cap:
            raise ResourceExhaustedError(
                f"{what or 'This model'} would need more than the server's per-model quota of {cap} bytes "
                f"({self.nbytes + nbytes} bytes of state). Split the model over several servers "
                "(ShardedClient), or start the server with a larger --max-model-bytes."
            )
        if self.owner is not None and not force:
            self.owner.check_bytes(nbytes, what or "This model")
        self._budget.take(nbytes, force=force)
        self.nbytes += nbytes
        if self.owner is not None:
            self.owner.add_bytes(nbytes)

    async def wait_take(self, nbytes: int, timeout_s: float) -> None:
        await self._budget.wait_take(nbytes, timeout_s)
        self.nbytes += nbytes

    def release(self) -> None:
        nbytes, self.nbytes = self.nbytes, 0
        if nbytes:
            self._budget.give(nbytes)
        if self.owner is not None:
            self.owner.release()

    @property
    def owner_name(self) -> str:
        return self.owner.name if self.owner is not None else ""


def state_bytes(variable_bytes: int, arrays_per_variable: int, sync_workers: int) -> int:
    """A variable's share of a model's state: itself, its slots and scratch, and the merge buffer
    of a synchronous step with several workers."""
    return variable_bytes * (arrays_per_variable + (1 if sync_workers > 1 else 0))


class StreamCounter:
    """Concurrent calls of the service on the whole server."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.active = 0

    def enter(self) -> None:
        if self.active >= self.limit:
            raise ResourceExhaustedError(
                f"The server is handling its limit of {self.limit} concurrent calls; retry shortly, or "
                "start the server with a larger --max-streams."
            )
        self.active += 1

    def leave(self) -> None:
        self.active -= 1


class ServerLimits:
    """The limits of one server and their running budgets (event loop only)."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits()
        self.memory = ByteBudget(self.limits.max_memory, "The models' state", "--max-memory")
        self.inflight = ByteBudget(self.limits.max_inflight_bytes, "A request's tensors", "--max-inflight-bytes")
        self.streams = StreamCounter(self.limits.max_streams)
        self.principals = PrincipalQuotas(self.limits.max_models_per_principal, self.limits.max_memory_per_principal)


async def idle_guarded(requests: AsyncIterator, timeout_s: float) -> AsyncIterator:
    """The messages of a request stream; ABORTED when the next one takes longer than ``timeout_s``."""
    iterator = requests.__aiter__()
    while True:
        try:
            message = await _within(iterator.__anext__(), timeout_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise AbortedError(
                f"The request stream sent nothing for {timeout_s:g} s and was dropped; nothing of it was "
                "applied. Send the request again (a server started with a larger --stream-idle-timeout "
                "waits longer).",
                details={REASON_KEY: REASON_IDLE_STREAM},
            ) from None
        yield message


async def _within(awaitable, timeout_s: float):
    if hasattr(asyncio, "timeout"):  # Python 3.11+: no task per message, as wait_for makes
        async with asyncio.timeout(timeout_s):
            return await awaitable
    return await asyncio.wait_for(awaitable, timeout_s)


# ------------------------------------------------------------------ command line

_SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)

# (flag, Limits field, parser kind, help)
_FLAGS = (
    (
        "--max-memory",
        "max_memory",
        "bytes",
        "bytes of model state (variables, slots, scratch) on the whole "
        "server; a CreateModel that would exceed it is refused before its variables are received "
        "(default: 3/4 of the machine's or the container's memory)",
    ),
    ("--max-model-bytes", "max_model_bytes", "bytes", "bytes of state of one model (default: --max-memory)"),
    ("--max-models", "max_models", "int", "models on the server (default: %(default)s)"),
    (
        "--max-models-per-principal",
        "max_models_per_principal",
        "int",
        "models each principal of --auth-tokens may have created; max_models= on its line overrides it "
        "(default: no quota)",
    ),
    (
        "--max-memory-per-principal",
        "max_memory_per_principal",
        "bytes",
        "bytes of state of each principal's models; max_memory= on its line overrides it (default: no quota)",
    ),
    (
        "--max-inflight-bytes",
        "max_inflight_bytes",
        "bytes",
        "bytes of request tensors being received or "
        "held by waiting pushes, all calls together; uploads beyond it wait (default: 1/4 of the memory)",
    ),
    (
        "--max-streams",
        "max_streams",
        "int",
        "concurrent calls on the whole server, health checks not counted (default: %(default)s)",
    ),
    (
        "--max-streams-per-connection",
        "max_streams_per_connection",
        "int",
        "concurrent calls on one client connection (default: %(default)s)",
    ),
    (
        "--stream-idle-timeout",
        "stream_idle_timeout_s",
        "seconds",
        "seconds a request stream may send nothing "
        "before it is dropped, and an upload may wait for in-flight room (default: %(default)s)",
    ),
    ("--max-workers", "max_workers", "int", "largest num_workers of a model (default: %(default)s)"),
    ("--max-sync-timeout", "max_sync_timeout_s", "seconds", "largest sync_timeout_s of a model (default: %(default)s)"),
    ("--max-variables", "max_variables", "int", "variables of one model (default: %(default)s)"),
    (
        "--max-message-bytes",
        "max_message_bytes",
        "bytes",
        "largest message received; clients send tensors in 1 MiB batches (default: %(default)s)",
    ),
    (
        "--max-config-bytes",
        "max_config_bytes",
        "bytes",
        "size of a model's optimizer config JSON (default: %(default)s)",
    ),
)


def parse_byte_size(text: str) -> int:
    """``"1073741824"``, ``"1G"``, ``"512MiB"``, ``"64k"`` -> bytes (binary multiples)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"must be a size such as 1073741824, 512M or 1GiB, got {text!r}")
    value = int(float(match.group(1)) * _SIZE_SUFFIXES[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"must be > 0, got {text!r}")
    return value


def add_arguments(parser) -> None:
    """The ``optserve serve`` flags of the limits (defaults: ``Limits``)."""
    import argparse

    def kind(name: str):
        def parse(text: str):
            try:
                if name == "bytes":
                    return parse_byte_size(text)
                value = int(text) if name == "int" else float(text)
            except ValueError as error:
                raise argparse.ArgumentTypeError(str(error)) from None
            if not value > 0 or not math.isfinite(value):
                raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
            return value

        return parse

    defaults = {f.name: f.default for f in dataclasses.fields(Limits)}
    group = parser.add_argument_group(
        "limits",
        "what one server accepts (requests beyond them are refused with the status codes protos/optserve.proto lists)",
    )
    for flag, field, name, help_text in _FLAGS:
        default = defaults[field]
        shown = default if isinstance(default, (int, float)) else None
        group.add_argument(
            flag,
            dest=f"limit_{field}",
            type=kind(name),
            default=None,
            metavar="B" if name == "bytes" else ("S" if name == "seconds" else "N"),
            help=help_text.replace("%(default)s", str(shown)),
        )


def from_arguments(args) -> Limits:
    return Limits().replace(**{field: getattr(args, f"limit_{field}", None) for _, field, _, _ in _FLAGS})
