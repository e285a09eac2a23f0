"""``optserve health ADDRESS``: the standard gRPC health check, as a command.

Meant for container health checks and scripts: it needs only grpcio and
grpcio-health-checking (already in the image), so no probe binary has to be
downloaded. Also runnable as ``python -m optserve.client.health ADDRESS``
(the form the compose file's health check uses).

Prints the serving status and exits with

- 0: the server answered SERVING;
- 1: anything else (NOT_SERVING, unknown service, unreachable, timed out);
- 2: bad command-line arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve.client import security

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1

# The probe talks to one known address: never route it through an HTTP proxy
# that happens to be configured in the environment.
_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


def check(address: str, service: str = "", timeout: float = 3.0, *, tls=None, token=None) -> str:
    """The serving status name ("SERVING", "NOT_SERVING", ...); raises grpc.RpcError on failure.

    ``tls``, ``token``: as ``Client`` takes them (health needs no token, but a TLS port needs TLS).
    """
    with security.open_channel(address, _CHANNEL_OPTIONS, tls=tls, token=token) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optserve health",
        description="Ask a server for its gRPC health status; exit 0 only when it is SERVING.",
    )
    parser.add_argument("address", help="server address, host:port")
    parser.add_argument("--service", default="", help='service name to check (default "": the whole server)')
    parser.add_argument(
        "--timeout", type=_positive_float, default=3.0, help="seconds to wait for the answer (default 3)"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing; only set the exit status")
    security.add_connection_arguments(parser)
    return parser


def health_main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = check(args.address, args.service, args.timeout, **security.connection_options(args))
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    except grpc.RpcError as error:
        if not args.quiet:
            print(f"optserve health: {args.address}: {error.code().name}: {error.details()}", file=sys.stderr)
        return EXIT_NOT_SERVING
    if not args.quiet:
        print(status)
    return EXIT_SERVING if status == "SERVING" else EXIT_NOT_SERVING


# `optserve COMMAND ...` calls `main(argv)` of the client module named for COMMAND.
main = health_main


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(health_main())
