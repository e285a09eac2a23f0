"""Who may call what: bearer tokens (or client certificates) with roles and model scopes.

``optserve serve --auth-tokens FILE`` loads a token file; every ParameterServer
call then needs ``authorization: Bearer <token>`` metadata (or, with mTLS, a
client certificate whose common name the file lists). Health and reflection
stay open: probes carry no token, and those services say nothing about models.

The file holds one principal per line, ``key=value`` fields separated by spaces::

    # name: a label for messages and the audit log (not secret)
    name=team-a-trainer role=worker models=team-a/* token=sha256:<64 hex digits>
    name=team-a-chief   role=worker models=team-a/* rights=aggregate token=sha256:...
    name=platform       role=admin  models=*        token=sha256:...
    name=worker-7       role=worker models=team-b/* cert_cn=worker-7.team-b

* ``role``: ``reader`` (ListModels, Pull, GetWeights), ``worker`` (+ CreateModel,
  ApplyGradients), ``admin`` (+ SetWeights, DeleteModel; Checkpoint when its
  models are ``*``, since a checkpoint holds every tenant's models).
* ``models``: comma-separated model ids or prefixes ending in ``*``; an exact id
  also covers the shard pieces a ShardedClient stores (``id@<fingerprint>`` and
  its ``/layout``).
* ``rights`` (optional, comma-separated): ``aggregate`` lets a non-admin push
  ``aggregated=True`` (one push that completes a synchronous step for every
  worker); ``set_weights`` lets a non-admin call SetWeights (Keras jobs with
  variable constraints or ``use_ema`` write variables back).
* ``token=sha256:<hex>``: the SHA-256 of the secret, never the secret itself
  (``optserve token`` prints a new token and its line). Tokens are random
  256-bit strings, so an unsalted hash is enough: nothing can be guessed from it.
* ``cert_cn=NAME``: with ``--tls-client-ca``, a verified client certificate
  whose subject common name is NAME stands for this principal when the call
  carries no token.
* ``max_models=N``, ``max_memory=SIZE`` (optional): this principal's quotas, the
  models it may have created and their bytes of state (``512M``, ``2GiB``;
  ``unlimited`` for none); without them ``--max-models-per-principal`` and
  ``--max-memory-per-principal`` apply (``optserve.server.quotas``).

A model outside the caller's scope is answered PERMISSION_DENIED, decided from
the model id and the scope alone, before the registry is asked: the answer is
the same whether the model exists or not (so it reveals nothing), and the
message can name the scope the caller lacks, where NOT_FOUND would send an
operator hunting for a model that is there. ListModels without a model id lists
only the models in scope.

The file is reread on SIGHUP (``ParameterServer.reload_auth``): new calls see the
new table; a file that does not parse keeps the old table and logs why.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from optserve.protos import optserve_pb2 as pb
from optserve.server.errors import InvalidArgumentError
from optserve.server.limits import parse_byte_size

log = logging.getLogger(__name__)
audit_log = logging.getLogger("optserve.audit")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name
READER, WORKER, ADMIN = "reader", "worker", "admin"
ROLES = (READER, WORKER, ADMIN)  # each role may do what the ones before it may
AGGREGATE, SET_WEIGHTS = "aggregate", "set_weights"
RIGHTS = (AGGREGATE, SET_WEIGHTS)
TOKEN_PREFIX = "osk_"
HASH_PREFIX = "sha256:"
FIELDS = ("name", "role", "models", "rights", "token", "cert_cn", "max_models", "max_memory")
UNLIMITED = "unlimited"  # a quota field's value for no quota
# Shard pieces of model "m" are stored as "m@<12 hex digits>" and "m@<...>/layout".
_SHARD_PIECE = re.compile(r"@[0-9a-f]{12}(/layout)?")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


# ------------------------------------------------------------------ principals


def hash_token(token: str) -> str:
    """The file form of a token: ``sha256:<hex>``."""
    return HASH_PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Principal:
    """One line of the token file: who the caller is, and what it may touch."""

    name: str
    role: str
    models: tuple[str, ...]
    rights: frozenset[str] = frozenset()
    token_digest: bytes | None = None  # raw SHA-256 of the token
    cert_cn: str | None = None
    # Quotas (optserve.server.quotas): None: the server's default; -1: unlimited.
    max_models: int | None = None
    max_memory: int | None = None

    @property
    def unrestricted(self) -> bool:
        return "*" in self.models

    def has_role(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def has_right(self, right: str) -> bool:
        return self.role == ADMIN or right in self.rights

    def may_touch(self, model_id: str) -> bool:
        return any(_scope_matches(pattern, model_id) for pattern in self.models)

    def describe(self) -> str:
        return f"{self.name!r} (role {self.role})"

    def scope_text(self) -> str:
        return ", ".join(self.models)


def _scope_matches(pattern: str, model_id: str) -> bool:
    if pattern.endswith("*"):
        return model_id.startswith(pattern[:-1])
    if model_id == pattern:
        return True
    return model_id.startswith(pattern) and _SHARD_PIECE.fullmatch(model_id[len(pattern) :]) is not None


# The caller of the RPC being handled (None: the server runs without --auth-tokens).
# Each RPC is its own asyncio task, so the value is per call.
_current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "optserve_principal", default=None
)


def current_principal() -> Principal | None:
    return _current_principal.get()


def act_as(principal: Principal | None) -> None:
    """Make ``principal`` the caller of the current task (a request that came some other way than
    a gRPC call: optserve.server.data_plane_requests)."""
    _current_principal.set(principal)


def visible(model_id: str) -> bool:
    """Whether the caller of the current RPC may see ``model_id`` (always, without auth)."""
    principal = _current_principal.get()
    return principal is None or principal.may_touch(model_id)


# ------------------------------------------------------------------ the token file


class TokenFileError(InvalidArgumentError):
    pass


def parse_token_file(text: str, source: str = "token file") -> list[Principal]:
    principals = [
        _parse_line(line, f"{source} line {number}")
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    _check_unique(principals, source)
    return principals


def _parse_line(line: str, where: str) -> Principal:
    fields: dict[str, str] = {}
    for word in line.split():
        key, sep, value = word.partition("=")
        if not sep or key not in FIELDS:
            raise TokenFileError(f"{where}: expected key=value with a key among {', '.join(FIELDS)}; received {key!r}.")
        if key in fields:
            raise TokenFileError(f"{where}: `{key}` is given twice.")
        fields[key] = value
    missing = [key for key in ("name", "role", "models") if not fields.get(key)]
    if missing:
        raise TokenFileError(
            f"{where}: missing {', '.join(missing)} (each line needs name=, role=, models= and token= or cert_cn=)."
        )
    role = fields["role"]
    if role not in ROLES:
        raise TokenFileError(f"{where}: `role` must be one of {', '.join(ROLES)}. Received: role={role!r}")
    models = tuple(m for m in fields["models"].split(",") if m)
    bad = [m for m in models if "*" in m[:-1]]
    if not models or bad:
        raise TokenFileError(
            f"{where}: `models` must list model ids or prefixes ending in '*' "
            f"(e.g. team-a/*), or '*'. Received: models={fields['models']!r}"
        )
    rights = frozenset(r for r in fields.get("rights", "").split(",") if r)
    if rights - set(RIGHTS):
        raise TokenFileError(f"{where}: `rights` may hold {', '.join(RIGHTS)}. Received: rights={fields['rights']!r}")
    if "token" not in fields and "cert_cn" not in fields:
        raise TokenFileError(f"{where}: give token=sha256:<hex> (see `optserve token`) or cert_cn=NAME.")
    return Principal(
        name=fields["name"],
        role=role,
        models=models,
        rights=rights,
        token_digest=_digest_field(fields.get("token"), where),
        cert_cn=fields.get("cert_cn"),
        max_models=_quota_field(fields, "max_models", where),
        max_memory=_quota_field(fields, "max_memory", where),
    )


def _quota_field(fields: dict[str, str], key: str, where: str) -> int | None:
    value = fields.get(key)
    if value is None:
        return None
    if value == UNLIMITED:
        return -1
    try:
        quota = parse_byte_size(value) if key == "max_memory" else int(value)
    except ValueError:
        quota = -1
    if quota < 0 or (key == "max_memory" and quota == 0):
        example = "a size such as 512M or 2GiB" if key == "max_memory" else "a number of models >= 0"
        raise TokenFileError(f"{where}: `{key}` must be {example}, or {UNLIMITED}. Received: {key}={value!r}")
    return quota


def _digest_field(value: str | None, where: str) -> bytes | None:
    if value is None:
        return None
    hexdigest = value[len(HASH_PREFIX) :] if value.startswith(HASH_PREFIX) else None
    if hexdigest is None or not _HEX_DIGEST.fullmatch(hexdigest):
        # Never echo the value: it may be a pasted secret.
        raise TokenFileError(
            f"{where}: `token` must be {HASH_PREFIX}<64 lowercase hex digits>, the SHA-256 of "
            "the token, not the token itself; `optserve token` prints the line to use."
        )
    return bytes.fromhex(hexdigest)


def _check_unique(principals: list[Principal], source: str) -> None:
    for attribute, what in (("name", "name"), ("token_digest", "token"), ("cert_cn", "cert_cn")):
        values = [getattr(p, attribute) for p in principals if getattr(p, attribute) is not None]
        repeated = {v for v in values if values.count(v) > 1}
        if repeated:
            shown = sorted(repeated) if attribute != "token_digest" else [f"{len(repeated)} token(s)"]
            raise TokenFileError(f"{source}: each {what} may appear once; repeated: {', '.join(map(str, shown))}.")


def new_token_line(name: str, role: str, models: str, rights: str = "", **quotas: str) -> tuple[str, str]:
    """(a new random token, its line for the token file); the line is checked by the parser.

    ``quotas``: ``max_models=``, ``max_memory=`` of the line (optserve.server.quotas)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    line = f"name={name} role={role} models={models}"
    if rights:
        line += f" rights={rights}"
    for key, value in quotas.items():
        line += f" {key}={value}"
    line += f" token={hash_token(token)}"
    parse_token_file(line, "the new line")
    return token, line


class TokenTable:
    """The principals of a token file, reloadable; lookups compare digests in constant time."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._principals = self._read()

    def _read(self) -> list[Principal]:
        try:
            with open(self.path, encoding="utf-8") as file:
                text = file.read()
        except OSError as error:
            raise TokenFileError(f"Cannot read the token file {self.path}: {error.strerror}.") from None
        return parse_token_file(text, self.path)

    def reload(self) -> bool:
        """Reread the file; on an error keep the current table (logged), so a typo locks nobody out."""
        try:
            principals = self._read()
        except TokenFileError as error:
            log.error("Token file not reloaded, the previous tokens stay in force: %s", error.message)
            return False
        self._principals = principals
        log.info("Token file %s reloaded: %d principal(s).", self.path, len(principals))
        return True

    def __len__(self) -> int:
        return len(self._principals)

    @property
    def lists_certificates(self) -> bool:
        return any(p.cert_cn is not None for p in self._principals)

    def by_token(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for principal in self._principals:  # no early exit: the time does not depend on which matched
            if principal.token_digest is not None and hmac.compare_digest(principal.token_digest, digest):
                found = principal
        return found

    def holds(self, principal: Principal) -> bool:
        """Whether ``principal`` is still a line of the file as read last (a reload may have removed it)."""
        return principal in self._principals

    def by_name(self, name: str) -> Principal | None:
        """The principal of ``name=`` (not secret: for quotas of models restored from a checkpoint)."""
        return next((p for p in self._principals if p.name == name), None)

    def by_certificate(self, common_names: Iterable[str]) -> Principal | None:
        names = set(common_names)
        return next((p for p in self._principals if p.cert_cn is not None and p.cert_cn in names), None)


# ------------------------------------------------------------------ the rules


@dataclasses.dataclass(frozen=True)
class Rule:
    role: str  # the least role that may call the RPC
    scope: str  # "model": the request names a model; "any": optional (ListModels); "all": every model
    model_id: Callable[[Any], str] = lambda message: ""
    right: str | None = None  # a right that grants the RPC to a lower role
    audited: bool = False  # logged on the audit log


def _field(message, *path: str) -> str:
    for name in path[:-1]:
        if not message.HasField(name):
            return ""
        message = getattr(message, name)
    return getattr(message, path[-1])


# Every RPC of the service needs an entry (a test checks it against the proto);
# a method without one is refused for everybody.
RPC_RULES: dict[str, Rule] = {
    "ListModels": Rule(READER, "any", lambda m: m.model_id),
    "Pull": Rule(READER, "model", lambda m: m.model_id),
    "GetWeights": Rule(READER, "model", lambda m: m.model_id),
    "CreateModel": Rule(WORKER, "model", lambda m: _field(m, "spec", "model_id")),
    "ApplyGradients": Rule(WORKER, "model", lambda m: _field(m, "header", "model_id")),
    "CommitStep": Rule(WORKER, "model", lambda m: m.model_id),
    "ApplyGradientsUnary": Rule(WORKER, "model", lambda m: _field(m, "header", "model_id")),
    "OpenSharedMemory": Rule(WORKER, "model", lambda m: m.model_id),
    "OpenDataPlane": Rule(WORKER, "model", lambda m: m.model_id),
    "SetWeights": Rule(ADMIN, "model", lambda m: m.model_id, right=SET_WEIGHTS, audited=True),
    "DeleteModel": Rule(ADMIN, "model", lambda m: m.model_id, audited=True),
    "Checkpoint": Rule(ADMIN, "all", audited=True),
}


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def bearer_token(metadata) -> str | None:
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "The call carries several `authorization` headers; send one.")
    value = values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "The `authorization` header must read 'Bearer <token>'.")
    return token.strip()


def _certificate_names(context) -> list[str]:
    auth_context = context.auth_context() or {}
    return [value.decode("utf-8", "replace") for value in auth_context.get("x509_common_name", ())]


def authenticate(table: TokenTable, metadata, context, certificates: bool = True) -> Principal:
    """The caller: by its token, else (``certificates``: the port verifies client certificates) by its
    certificate's common name."""
    token = bearer_token(metadata)
    if token is not None:
        principal = table.by_token(token)
        if principal is None:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "The bearer token is not known to this server (revoked, mistyped, or meant for another "
                "server). Ask the server's operator for a token.",
            )
        return principal
    names = _certificate_names(context) if certificates else []
    principal = table.by_certificate(names) if names else None
    if principal is not None:
        return principal
    certificate = (
        f" and its client certificate (CN={', '.join(names)}) is not listed in the token file" if names else ""
    )
    raise Refused(
        grpc.StatusCode.UNAUTHENTICATED,
        f"This server requires a token: the call carries no `authorization: Bearer <token>` "
        f"metadata{certificate}. Pass token=... to the client or set OPTSERVE_TOKEN.",
    )


def authorize(principal: Principal, rpc: str, message) -> str:
    """Refuses (PERMISSION_DENIED) what ``principal`` may not do; returns the model id concerned."""
    rule = RPC_RULES.get(rpc)
    if rule is None:
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED, f"{rpc} has no access rule on this server; nobody may call it."
        )
    if not principal.has_role(rule.role) and not (rule.right and rule.right in principal.rights):
        extra = f" or the {rule.right} right" if rule.right else ""
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{principal.describe()} may not call {rpc}: it needs role {rule.role}{extra}.",
        )
    if rule.scope == "all":
        if not principal.unrestricted:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{rpc} concerns every model on the server, but {principal.describe()} may touch only "
                f"models {principal.scope_text()}: it needs models=*.",
            )
        return "*"
    model_id = rule.model_id(message) if message is not None else ""
    if model_id and not principal.may_touch(model_id):
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{principal.describe()} may touch models {principal.scope_text()}; model {model_id!r} is "
            "outside that scope.",
        )
    if (
        rpc in ("ApplyGradients", "ApplyGradientsUnary")
        and message is not None
        and _field(message, "header", "aggregated")
        and not principal.has_right(AGGREGATE)
    ):
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{principal.describe()} may not push aggregated=True (a push that completes the step for "
            f"every worker): it needs the {AGGREGATE} right or role admin. Push your own gradients with "
            "aggregated=False.",
        )
    return model_id


# ------------------------------------------------------------------ the interceptor


async def _prepended(first, rest):
    yield first
    async for message in rest:
        yield message


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every ParameterServer call before its handler sees the request; other services pass."""

    def __init__(self, table: TokenTable, *, verified_certificates: bool = False):
        self.table = table
        # cert_cn lines count only where the port verified the client's certificate (mTLS).
        self.verified_certificates = verified_certificates

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        service, _, rpc = handler_call_details.method.lstrip("/").rpartition("/")
        if handler is None or service != SERVICE_NAME:
            return handler  # health and reflection stay reachable for probes
        return _guarded(handler, _Admission(self, rpc, handler_call_details.invocation_metadata))


class _Admission:
    """One call's checks: the caller first (before any request byte is read), then the request."""

    def __init__(self, interceptor: AuthInterceptor, rpc: str, metadata):
        self.interceptor, self.rpc, self.metadata = interceptor, rpc, metadata
        self.audited = RPC_RULES.get(rpc, Rule(ADMIN, "all")).audited
        self.principal: Principal | None = None
        self.model_id = ""

    async def authenticate(self, context) -> None:
        try:
            self.principal = authenticate(
                self.interceptor.table, self.metadata, context, self.interceptor.verified_certificates
            )
        except Refused as refusal:
            await self._refuse(refusal, context)

    async def authorize(self, context, message) -> None:
        if self.principal is None:  # authenticate() refused, and aborting the call raised
            raise RuntimeError("authorize() needs an authenticated caller")
        try:
            self.model_id = authorize(self.principal, self.rpc, message)
        except Refused as refusal:
            await self._refuse(refusal, context)
        _current_principal.set(self.principal)

    async def _refuse(self, refusal: Refused, context) -> None:
        who = self.principal.describe() if self.principal is not None else "an unauthenticated caller"
        audit_log.info(
            "refused %s by %s from %s: %s %s", self.rpc, who, context.peer(), refusal.code.name, refusal.message
        )
        await context.abort(refusal.code, refusal.message)

    def audit(self, context, error: BaseException | None) -> None:
        code = context.code() if hasattr(context, "code") else None
        if error is None and code in (None, grpc.StatusCode.OK, 0):
            outcome = "OK"
        else:
            outcome = getattr(code, "name", None) or type(error).__name__
        target = "every model" if self.model_id == "*" else f"model {self.model_id!r}"
        who = self.principal.describe() if self.principal is not None else "an unauthenticated caller"
        audit_log.info("%s by %s on %s from %s: %s", self.rpc, who, target, context.peer(), outcome)


async def _empty():
    return
    yield  # pragma: no cover - makes this an async generator


_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _guarded(handler, admission: _Admission):
    """``handler`` whose behaviour runs only once ``admission`` let the call in."""
    streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
    inner = {
        (False, False): handler.unary_unary,
        (True, False): handler.stream_unary,
        (False, True): handler.unary_stream,
        (True, True): handler.stream_stream,
    }[(streaming_in, streaming_out)]

    async def admitted(request, context):
        """The request to hand on, once the caller and its (first) request passed."""
        await admission.authenticate(context)
        if not streaming_in:
            await admission.authorize(context, request)
            return request
        try:
            first = await request.__anext__()
        except StopAsyncIteration:
            await admission.authorize(context, None)  # the handler names what is missing
            return _empty()
        await admission.authorize(context, first)
        return _prepended(first, request)

    async def streaming_behaviour(request, context):
        request = await admitted(request, context)
        async for response in inner(request, context):
            yield response

    async def unary_behaviour(request, context):
        request = await admitted(request, context)
        if not admission.audited:
            return await inner(request, context)
        error = None
        try:
            return await inner(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            admission.audit(context, error)

    behaviour = streaming_behaviour if streaming_out else unary_behaviour
    return _HANDLER_FACTORIES[(streaming_in, streaming_out)](
        behaviour, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
