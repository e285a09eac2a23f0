"""How a client reaches a secured server: TLS settings, a bearer token, and the channel they make.

    Client("ps.example:50051", tls={"ca": "ca.pem"}, token=os.environ["MY_TOKEN"])
    Client("ps.example:50051", tls=TLSOptions(ca="ca.pem", cert="me.pem", key="me.key"))  # mTLS

``tls``: None (the default) reads the environment (below) and is plaintext when it
sets nothing; False forces plaintext; True is TLS with the system's CA bundle; a
path is the CA bundle; a dict or :class:`TLSOptions` gives ``ca``, ``cert``,
``key`` (client certificate and key, for mTLS) and ``server_name`` (the name the
server's certificate must carry, when it differs from the address's host).
Files may also be given as PEM bytes.

``token``: None reads ``OPTSERVE_TOKEN`` (or the file named by
``OPTSERVE_TOKEN_FILE``); False sends none; a string is sent as
``authorization: Bearer <token>`` on every call.

Environment variables, so unchanged worker code can be pointed at a secure
server: ``OPTSERVE_TLS_CA``, ``OPTSERVE_TLS_CERT``, ``OPTSERVE_TLS_KEY``,
``OPTSERVE_TLS_SERVER_NAME``, ``OPTSERVE_TLS=1`` (TLS with the system's CAs),
``OPTSERVE_TOKEN``, ``OPTSERVE_TOKEN_FILE``.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

__all__ = [
    "TLSOptions",
    "resolve_tls",
    "resolve_token",
    "open_channel",
    "add_connection_arguments",
    "connection_options",
]

ENV_TLS = "OPTSERVE_TLS"
ENV_TLS_CA = "OPTSERVE_TLS_CA"
ENV_TLS_CERT = "OPTSERVE_TLS_CERT"
ENV_TLS_KEY = "OPTSERVE_TLS_KEY"
ENV_TLS_SERVER_NAME = "OPTSERVE_TLS_SERVER_NAME"
ENV_TOKEN = "OPTSERVE_TOKEN"
ENV_TOKEN_FILE = "OPTSERVE_TOKEN_FILE"
_TRUE = ("1", "true", "yes", "on")


@dataclasses.dataclass(frozen=True)
class TLSOptions:
    """TLS settings of a client: CA bundle (None: the system's), client certificate and key, server name."""

    ca: Any = None
    cert: Any = None
    key: Any = None
    server_name: str | None = None

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            given, missing = ("cert", "key") if self.key is None else ("key", "cert")
            raise ValueError(
                f"TLS `{given}` needs `{missing}` too: a client certificate goes with its private "
                f"key. Received: {given}={_shown(getattr(self, given))}"
            )
        if self.server_name is not None and (not isinstance(self.server_name, str) or not self.server_name):
            raise ValueError(
                f"TLS `server_name` must be a non-empty string. Received: server_name={self.server_name!r}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TLSOptions | None:
        """The settings the ``OPTSERVE_TLS*`` variables give; None when they ask for no TLS."""
        environ = os.environ if environ is None else environ
        values = {
            field: environ.get(name) or None
            for field, name in (
                ("ca", ENV_TLS_CA),
                ("cert", ENV_TLS_CERT),
                ("key", ENV_TLS_KEY),
                ("server_name", ENV_TLS_SERVER_NAME),
            )
        }
        if not any(values.values()) and environ.get(ENV_TLS, "").lower() not in _TRUE:
            return None
        return cls(**values)

    @property
    def mutual(self) -> bool:
        return self.cert is not None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca, "ca"),
            private_key=_pem(self.key, "key"),
            certificate_chain=_pem(self.cert, "cert"),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def to_config(self) -> dict | None:
        """File paths and server name, for saved configs; PEM given as bytes is left out (it may be a key)."""
        config = {
            field: os.fspath(value)
            for field in ("ca", "cert", "key")
            if isinstance(value := getattr(self, field), (str, os.PathLike))
        }
        if self.server_name:
            config["server_name"] = self.server_name
        if self.cert is not None and "cert" not in config:
            return None  # the client key was given as bytes: a saved config could not rebuild this
        return config


def _shown(value) -> str:
    return "<PEM bytes>" if isinstance(value, bytes) else repr(value)


def _pem(source, what: str) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"TLS `{what}` must be a file path or PEM bytes. Received: {type(source).__name__}")
    try:
        with open(source, "rb") as file:
            return file.read()
    except OSError as error:
        raise ValueError(f"Cannot read the TLS `{what}` file {os.fspath(source)!r}: {error.strerror}.") from None


def resolve_tls(tls=None) -> TLSOptions | None:
    """The TLS settings for ``tls`` as ``Client(tls=...)`` takes it (see the module docstring)."""
    if tls is None:
        return TLSOptions.from_env()
    if tls is False:
        return None
    if tls is True:
        return TLSOptions.from_env() or TLSOptions()
    if isinstance(tls, TLSOptions):
        return tls
    if isinstance(tls, (str, os.PathLike)):
        return TLSOptions(ca=tls)
    if isinstance(tls, Mapping):
        unknown = sorted(set(tls) - {f.name for f in dataclasses.fields(TLSOptions)})
        if unknown:
            raise ValueError(f"`tls` takes the keys ca, cert, key, server_name. Received unknown keys: {unknown}")
        return TLSOptions(**tls)
    raise TypeError(
        f"`tls` must be None, True/False, a CA bundle path, a dict or a TLSOptions. Received: tls={type(tls).__name__}"
    )


def resolve_token(token=None) -> str | None:
    """The bearer token for ``token`` as ``Client(token=...)`` takes it (see the module docstring)."""
    if token is False:
        return None
    if token is None:
        token = os.environ.get(ENV_TOKEN) or None
        path = os.environ.get(ENV_TOKEN_FILE)
        if token is None and path:
            try:
                with open(path, encoding="utf-8") as file:
                    token = file.read().strip()
            except OSError as error:
                raise ValueError(f"Cannot read {ENV_TOKEN_FILE}={path!r}: {error.strerror}.") from None
        if token is None:
            return None
    if not isinstance(token, str):
        raise TypeError(f"`token` must be a string, None or False. Received: {type(token).__name__}")
    token = token.strip()
    # Never echo the token in a message.
    if not token or any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ValueError("`token` must be a non-empty string without spaces or control characters.")
    return token


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:
        return "_BearerToken(<hidden>)"

    def _details(self, details):
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


@dataclasses.dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_channel(address: str, options: Sequence[tuple[str, Any]] = (), *, tls=None, token=None) -> grpc.Channel:
    """A channel to ``address``: TLS per ``tls``, with the bearer token per ``token`` on every call."""
    tls_options = resolve_tls(tls)
    bearer = resolve_token(token)
    options = list(options)
    if tls_options is None:
        if bearer is not None and not _is_loopback(address):
            warnings.warn(
                f"Sending a token to {address} without TLS: anyone on the network path can read it. "
                "Pass tls=... (or set OPTSERVE_TLS_CA).",
                stacklevel=3,
            )
        channel = grpc.insecure_channel(address, options=options)
    else:
        channel = grpc.secure_channel(
            address, tls_options.credentials(), options=options + tls_options.channel_options()
        )
    if bearer is not None:
        channel = grpc.intercept_channel(channel, _BearerToken(bearer))
    return channel


# ------------------------------------------------------------------ command lines


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name, --token-file (else the environment)."""
    group = parser.add_argument_group(
        "connection security",
        "TLS and token; unset options come from OPTSERVE_TLS_CA, OPTSERVE_TLS_CERT, "
        "OPTSERVE_TLS_KEY, OPTSERVE_TLS_SERVER_NAME, OPTSERVE_TOKEN, OPTSERVE_TOKEN_FILE",
    )
    group.add_argument("--tls", action="store_true", help="use TLS (implied by --tls-ca/--tls-cert)")
    group.add_argument("--tls-ca", metavar="FILE", help="CA bundle (PEM) that signed the server's certificate")
    group.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM), for mTLS")
    group.add_argument("--tls-key", metavar="FILE", help="client private key (PEM), for mTLS")
    group.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="name the server's certificate must carry, when it is not the address's host",
    )
    group.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the bearer token (kept off the command line, which others can read)",
    )


def connection_options(args: argparse.Namespace) -> dict:
    """``{"tls": ..., "token": ...}`` for ``Client(...)`` from :func:`add_connection_arguments`' options."""
    given = {field: getattr(args, f"tls_{field}", None) for field in ("ca", "cert", "key", "server_name")}
    tls = TLSOptions(**given) if any(given.values()) else (True if getattr(args, "tls", False) else None)
    token = None
    if getattr(args, "token_file", None):
        try:
            with open(args.token_file, encoding="utf-8") as file:
                token = resolve_token(file.read())
        except OSError as error:
            raise ValueError(f"Cannot read --token-file {args.token_file!r}: {error.strerror}.") from None
    return {"tls": tls, "token": token}
