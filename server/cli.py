"""The ``optserve`` command: ``serve`` a parameter server; ``checkpoint``, ``inspect``, ``demo``, ``health`` use one.

optserve serve --host 127.0.0.1 --port 50051 --device auto --checkpoint-dir DIR --checkpoint-every 60s
optserve checkpoint 127.0.0.1:50051      (prints the new checkpoint's path)
optserve token --name team-a --role worker --models 'team-a/*'   (a new token and its file line)
optserve inspect ...     (optserve.client.inspect)
optserve delete ADDRESS MODEL [--force]   (optserve.client.delete)
optserve demo ...        (optserve.client.demo)
optserve health ...      (optserve.client.health)
"""

from __future__ import annotations

import argparse
import logging
import sys

from optserve.server import limits
from optserve.server.app import DEFAULT_GRACE_S, DEFAULT_SYNC_TIMEOUT_S
from optserve.server.checkpoint import DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHECKPOINT_KEEP, parse_checkpoint_every
from optserve.server.errors import OptserveError
from optserve.server.servicer import DEFAULT_MAX_REQUEST_BYTES

# Subcommands implemented by the client package; imported only when run, so `serve` never loads them.
CLIENT_COMMANDS = {
    "inspect": ("optserve.client.inspect", "show the models, optimizer state and variables of a server"),
    "delete": ("optserve.client.delete", "delete a model from a server (refused while in use, unless --force)"),
    "demo": ("optserve.client.demo", "start a server and two workers that train a small model against it"),
    "health": ("optserve.client.health", "ask a server for its gRPC health status (exit 0 when SERVING)"),
    "top": ("optserve.client.watch", "a live table of a server's models (optserve inspect ADDRESS --watch)"),
}


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _checkpoint_every(text: str):
    try:
        return parse_checkpoint_every(text)
    except OptserveError:
        raise argparse.ArgumentTypeError(
            f"must be a time (60s, 5m, 1h, or seconds as 30), updates (500steps) or 0/off, got {text!r}"
        ) from None


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _model_ttl(text: str) -> float:
    """``--model-ttl``: seconds (a plain number, or 30s, 10m, 12h, 7d); 0/off: models never expire."""
    value = text.strip().lower()
    if value in ("0", "off", "none"):
        return 0.0
    scale = _DURATION_UNITS.get(value[-1:], None)
    number = value[:-1] if scale is not None else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        seconds = float("nan")
    if not (seconds > 0 and seconds != float("inf")):
        raise argparse.ArgumentTypeError(
            f"must be a time (90, 30s, 10m, 12h, 7d; a plain number is seconds) or 0/off, got {text!r}"
        )
    return seconds


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optserve", description="Keras optimizers as a service.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser("serve", help="run a parameter server in the foreground (SIGTERM/SIGINT stop it)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=_port, default=50051, help="port; 0 picks a free one (default: %(default)s)")
    serve.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="where updates run: gpu needs CuPy and a CUDA device; auto picks it when present",
    )
    serve.add_argument(
        "--sync-timeout",
        type=_positive_float,
        default=DEFAULT_SYNC_TIMEOUT_S,
        metavar="S",
        help="seconds a synchronous step waits for its last worker, for models that do not "
        "set sync_timeout_s (default: %(default)s)",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="B",
        help="largest total tensor payload of one request (default: %(default)s)",
    )
    serve.add_argument(
        "--apply-threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="threads running optimizer updates (default: min(8, cores), at least 2)",
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_S,
        metavar="S",
        help="seconds calls in flight get to finish on shutdown (default: %(default)s)",
    )
    serve.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="write checkpoints of every model here, and restore the newest valid one on start "
        "(health is NOT_SERVING meanwhile); a final one is written on SIGTERM/SIGINT",
    )
    serve.add_argument(
        "--checkpoint-every",
        type=_checkpoint_every,
        default=None,
        metavar="WHEN",
        help="with --checkpoint-dir: a time (60s, 5m, 1h; a plain number is seconds), a number "
        "of applied updates, all models together (500steps), or 0/off for checkpoints only "
        f"on request (`optserve checkpoint`) and at shutdown (default: {DEFAULT_CHECKPOINT_EVERY})",
    )
    serve.add_argument(
        "--checkpoint-keep",
        type=_positive_int,
        default=None,
        metavar="K",
        help=f"with --checkpoint-dir: checkpoints kept, newest first (default: {DEFAULT_CHECKPOINT_KEEP})",
    )
    _add_security_arguments(serve)
    serve.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST as --host; 0 picks a "
        "free port, printed at start); default: no metrics endpoint",
    )
    serve.add_argument(
        "--model-ttl",
        type=_model_ttl,
        default=0.0,
        metavar="TIME",
        help="delete a model idle for longer than TIME (90, 30s, 10m, 12h, 7d), never one in use: "
        "with a call in flight (a worker parked in a step included), a step holding pushes, "
        "or any push, pull, get/set of weights, create or join within TIME; listing it is "
        "not activity. Deletions are logged, and followed by a checkpoint with "
        "--checkpoint-dir (default: off)",
    )
    serve.add_argument(
        "--shared-memory-dir",
        default="/dev/shm",
        metavar="DIR",
        help="where segments for workers on this host are made: their gradients and new values go "
        "through shared memory instead of gRPC (default: %(default)s; see deploy/README.md for containers)",
    )
    serve.add_argument(
        "--no-shared-memory",
        action="store_true",
        help="every worker pushes over gRPC, even on this host",
    )
    serve.add_argument(
        "--no-data-plane",
        action="store_true",
        help="no TCP data port beside gRPC: large pushes go as gRPC messages (with TLS there is none anyway)",
    )
    serve.add_argument(
        "--data-port",
        type=int,
        default=0,
        metavar="PORT",
        help="the TCP port beside gRPC that large pushes' bytes use (default: any free port; fix it to publish "
        "it from a container, see deploy/README.md)",
    )
    serve.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log verbosity on stderr (default: %(default)s)",
    )
    limits.add_arguments(serve)
    checkpoint = commands.add_parser(
        "checkpoint",
        help="have a running server (started with --checkpoint-dir) write a checkpoint now",
        description="Ask the server at ADDRESS to write a checkpoint now, and print its path "
        "(with several servers, one 'ADDRESS PATH' line each). Exit 0 when every server wrote one.",
    )
    checkpoint.add_argument(
        "address",
        metavar="ADDRESS",
        help="host:port of the server; several, joined by commas, for the shards of a model",
    )
    checkpoint.add_argument(
        "--timeout",
        type=_positive_float,
        default=600.0,
        metavar="S",
        help="seconds to wait for each checkpoint to be written (default: %(default)s)",
    )
    _add_connection_arguments(checkpoint)
    _add_token_command(commands)
    for name, (_, help_text) in CLIENT_COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def _add_security_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("security", "TLS, client certificates and tokens (see deploy/README.md)")
    group.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="the server's certificate chain (PEM); with --tls-key, the port speaks only TLS",
    )
    group.add_argument("--tls-key", metavar="FILE", help="the server's private key (PEM)")
    group.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="require client certificates signed by these CA certificates (PEM): mTLS",
    )
    group.add_argument(
        "--auth-tokens",
        metavar="FILE",
        help="require a bearer token (or a listed client certificate) on every call except health "
        "and reflection; one principal per line with its role and models (see "
        "`optserve token --help`); reread on SIGHUP",
    )


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    # The client side's options (optserve.client.security.add_connection_arguments, which a test
    # compares with these), spelled out here so that building this parser never imports the client.
    group = parser.add_argument_group(
        "connection security",
        "TLS and token; unset options come from "
        "OPTSERVE_TLS_CA, OPTSERVE_TLS_CERT, OPTSERVE_TLS_KEY, OPTSERVE_TOKEN, ...",
    )
    group.add_argument("--tls", action="store_true", help="use TLS (implied by --tls-ca/--tls-cert)")
    group.add_argument("--tls-ca", metavar="FILE", help="CA bundle (PEM) that signed the server's certificate")
    group.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM), for mTLS")
    group.add_argument("--tls-key", metavar="FILE", help="client private key (PEM), for mTLS")
    group.add_argument("--tls-server-name", metavar="NAME", help="name the server's certificate must carry")
    group.add_argument("--token-file", metavar="FILE", help="file holding the bearer token")


def _add_token_command(commands) -> None:
    from optserve.server.auth import RIGHTS, ROLES

    token = commands.add_parser(
        "token",
        help="print a new random token and its line for an --auth-tokens file",
        description="Make a new token. Prints the token (shown only here: hand it to the client, e.g. as "
        "OPTSERVE_TOKEN) and then the line for the --auth-tokens file, which holds only its SHA-256. "
        "With --append FILE the line goes into FILE instead, and only the token is printed.",
    )
    token.add_argument("--name", required=True, help="who holds the token, for messages and the audit log")
    token.add_argument("--role", required=True, choices=ROLES, help="reader, worker (+ create, push) or admin")
    token.add_argument(
        "--models",
        required=True,
        metavar="IDS",
        help="model ids or prefixes ending in '*', comma-separated (team-a/*); '*' for all",
    )
    token.add_argument(
        "--rights", default="", metavar="RIGHTS", help=f"extra rights, comma-separated: {', '.join(RIGHTS)}"
    )
    token.add_argument("--max-models", metavar="N", help="this principal's quota of models (or 'unlimited')")
    token.add_argument("--max-memory", metavar="SIZE", help="its quota of bytes of state: 512M, 2GiB, 'unlimited'")
    token.add_argument("--append", metavar="FILE", help="append the line to FILE (created with mode 0600)")


def run_token(args: argparse.Namespace) -> int:
    import os

    from optserve.server.auth import new_token_line

    try:
        quotas = {key: value for key in ("max_models", "max_memory") if (value := getattr(args, key)) is not None}
        secret, line = new_token_line(args.name, args.role, args.models, args.rights, **quotas)
    except OptserveError as error:
        print(f"optserve token: error: {error.message}", file=sys.stderr)
        return 2
    print(secret, flush=True)
    if args.append is None:
        print(line, flush=True)
        return 0
    descriptor = os.open(args.append, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(descriptor, "a", encoding="utf-8") as file:
        file.write(line + "\n")
    print(
        f"optserve token: appended {args.name!r} to {args.append}; send the server SIGHUP to load it.", file=sys.stderr
    )
    return 0


def _security_options(args: argparse.Namespace) -> dict:
    return {
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "auth_tokens": args.auth_tokens,
    }


def _announce(address: str) -> None:
    print(f"optserve listening on {address}", flush=True)


def _checkpoint_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    if args.checkpoint_dir is None:
        given = [
            flag
            for flag, value in (
                ("--checkpoint-every", args.checkpoint_every),
                ("--checkpoint-keep", args.checkpoint_keep),
            )
            if value is not None
        ]
        if given:
            parser.error(f"{' and '.join(given)} need{'s' if len(given) == 1 else ''} --checkpoint-dir")
        return {}
    return {
        "checkpoint_dir": args.checkpoint_dir,
        "checkpoint_every": args.checkpoint_every if args.checkpoint_every is not None else DEFAULT_CHECKPOINT_EVERY,
        "checkpoint_keep": args.checkpoint_keep or DEFAULT_CHECKPOINT_KEEP,
    }


def run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from optserve.server.app import serve

    checkpoint_options = _checkpoint_options(args, parser)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return serve(
            args.host,
            args.port,
            args.device,
            grace=args.grace,
            on_listening=_announce,
            sync_timeout_s=args.sync_timeout,
            max_request_bytes=args.max_request_bytes,
            apply_threads=args.apply_threads,
            metrics_port=args.metrics_port,
            model_ttl_s=args.model_ttl or None,
            shared_memory_dir=None if args.no_shared_memory else args.shared_memory_dir,
            data_plane=not args.no_data_plane,
            data_port=args.data_port,
            limits=limits.from_arguments(args),
            **checkpoint_options,
            **_security_options(args),
        )
    except (OptserveError, OSError) as exc:
        # Startup problems (busy port, no GPU) are the operator's to fix: a message, not a traceback.
        print(f"optserve serve: error: {exc}", file=sys.stderr, flush=True)
        return 1


def run_checkpoint(args: argparse.Namespace) -> int:
    """``optserve checkpoint ADDRESS``: one checkpoint per server; prints where each went."""
    from optserve.client.client import Client, parse_addresses
    from optserve.client.client import OptserveError as ClientError
    from optserve.client.security import connection_options

    try:
        addresses = parse_addresses(args.address)
    except ValueError as error:
        print(f"optserve checkpoint: error: {error}", file=sys.stderr)
        return 2
    try:
        security = connection_options(args)
    except ValueError as error:
        print(f"optserve checkpoint: error: {error}", file=sys.stderr)
        return 2
    status = 0
    for address in addresses:
        try:
            with Client(address, timeout=args.timeout, **security) as client:
                path, models = client.checkpoint()
        except ClientError as error:
            print(f"optserve checkpoint: {address}: {error.code}: {error.message}", file=sys.stderr, flush=True)
            status = 1
            continue
        print(path if len(addresses) == 1 else f"{address} {path}", flush=True)
        print(
            f"optserve checkpoint: {address}: {models} model{'s' if models != 1 else ''} in {path}",
            file=sys.stderr,
            flush=True,
        )
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in CLIENT_COMMANDS:
        import importlib

        module = importlib.import_module(CLIENT_COMMANDS[argv[0]][0])
        return module.main(argv[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "checkpoint":
        return run_checkpoint(args)
    if args.command == "token":
        return run_token(args)
    return run_serve(args, parser)


if __name__ == "__main__":
    sys.exit(main())
