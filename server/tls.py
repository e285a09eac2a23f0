"""TLS for the server's port, and the warnings for a port left open.

``--tls-cert`` and ``--tls-key`` (PEM) make the port TLS-only; ``--tls-client-ca``
also requires every client to present a certificate signed by that CA (mTLS).
The files are read once, at start: rotating a certificate means a restart
(workers retry through it).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os

import grpc

from optserve.server.errors import InvalidArgumentError

PEM_MARKER = b"-----BEGIN "


@dataclasses.dataclass(frozen=True)
class ServerTLS:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def credentials(self) -> grpc.ServerCredentials:
        client_ca = _read_pem(self.client_ca_file, "--tls-client-ca") if self.client_ca_file is not None else None
        return grpc.ssl_server_credentials(
            [(_read_pem(self.key_file, "--tls-key"), _read_pem(self.cert_file, "--tls-cert"))],
            root_certificates=client_ca,
            require_client_auth=self.mutual,
        )


def server_tls(cert_file=None, key_file=None, client_ca_file=None) -> ServerTLS | None:
    """The TLS settings from the three options (None: plaintext); refuses incomplete combinations."""
    if cert_file is None and key_file is None:
        if client_ca_file is not None:
            raise InvalidArgumentError(
                "`tls_client_ca` (--tls-client-ca) needs `tls_cert` and `tls_key` "
                "(--tls-cert, --tls-key): client certificates are checked over TLS."
            )
        return None
    if cert_file is None or key_file is None:
        given, missing = ("tls_cert", "tls_key") if key_file is None else ("tls_key", "tls_cert")
        raise InvalidArgumentError(
            f"`{given}` needs `{missing}` too: TLS needs the server's certificate and its private key (PEM files)."
        )
    tls = ServerTLS(
        os.fspath(cert_file), os.fspath(key_file), None if client_ca_file is None else os.fspath(client_ca_file)
    )
    tls.credentials()  # read and checked now, so a bad file is a startup error
    return tls


def _read_pem(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise InvalidArgumentError(f"Cannot read {flag} file {path}: {error.strerror}.") from None
    if PEM_MARKER not in data:
        raise InvalidArgumentError(
            f"{flag} file {path} is not PEM (no '-----BEGIN' line); convert it with "
            "`openssl x509 -outform pem` (certificates) or `openssl pkey` (keys)."
        )
    return data


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warnings(host: str, tls: ServerTLS | None, tokens: bool) -> list[str]:
    """What an operator should hear about a port reachable from other machines."""
    if is_loopback(host):
        return []
    where = f"{host} is reachable from other machines"
    if tls is None and not tokens:
        return [
            f"{where} with neither TLS nor tokens: anyone who can connect may read, overwrite and delete "
            "every model. Use --tls-cert/--tls-key and --auth-tokens (see deploy/README.md)."
        ]
    if tls is None:
        return [f"{where} without TLS: tokens and tensors travel in clear text. Use --tls-cert/--tls-key."]
    if not tokens and not tls.mutual:
        return [
            f"{where} with TLS but no client authentication: any client may read, overwrite and delete "
            "every model. Add --auth-tokens FILE or --tls-client-ca FILE."
        ]
    return []
