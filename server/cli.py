"""The ``optserve`` command: ``serve`` a parameter server; ``checkpoint``, ``inspect``, ``demo``, ``health`` use one.

    optserve serve --host 127.0.0.1 --port 50051 --device auto --checkpoint-dir DIR --checkpoint-every 60s
    optserve checkpoint 127.0.0.1:50051      (prints the new checkpoint's path)
    optserve inspect ...     (optserve.client.inspect)
    optserve demo ...        (optserve.client.demo)
    optserve health ...      (optserve.client.health)
"""
from __future__ import annotations

import argparse
import logging
import sys

from optserve.server.app import DEFAULT_GRACE_S, DEFAULT_SYNC_TIMEOUT_S
from optserve.server.checkpoint import DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHECKPOINT_KEEP, parse_checkpoint_every
from optserve.server import limits
from optserve.server.errors import OptserveError
from optserve.server.servicer import DEFAULT_MAX_REQUEST_BYTES

# Subcommands implemented by the client package; imported only when run, so `serve` never loads them.
CLIENT_COMMANDS = {
    "inspect": ("optserve.client.inspect", "show the models, optimizer state and variables of a server"),
    "demo": ("optserve.client.demo", "start a server and two workers that train a small model against it"),
    "health": ("optserve.client.health", "ask a server for its gRPC health status (exit 0 when SERVING)"),
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
            f"must be a time (60s, 5m, 1h, or seconds as 30), updates (500steps) or 0/off, got {text!r}") from None


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
    serve.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                       help="where updates run: gpu needs CuPy and a CUDA device; auto picks it when present")
    serve.add_argument("--sync-timeout", type=_positive_float, default=DEFAULT_SYNC_TIMEOUT_S, metavar="S",
                       help="seconds a synchronous step waits for its last worker, for models that do not "
                            "set sync_timeout_s (default: %(default)s)")
    serve.add_argument("--max-request-bytes", type=_positive_int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="B",
                       help="largest total tensor payload of one request (default: %(default)s)")
    serve.add_argument("--apply-threads", type=_positive_int, default=None, metavar="N",
                       help="threads running optimizer updates (default: min(8, cores), at least 2)")
    serve.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, metavar="S",
                       help="seconds calls in flight get to finish on shutdown (default: %(default)s)")
    serve.add_argument("--checkpoint-dir", metavar="DIR",
                       help="write checkpoints of every model here, and restore the newest valid one on start "
                            "(health is NOT_SERVING meanwhile); a final one is written on SIGTERM/SIGINT")
    serve.add_argument("--checkpoint-every", type=_checkpoint_every, default=None, metavar="WHEN",
                       help="with --checkpoint-dir: a time (60s, 5m, 1h; a plain number is seconds), a number "
                            "of applied updates, all models together (500steps), or 0/off for checkpoints only "
                            f"on request (`optserve checkpoint`) and at shutdown (default: {DEFAULT_CHECKPOINT_EVERY})")
    serve.add_argument("--checkpoint-keep", type=_positive_int, default=None, metavar="K",
                       help=f"with --checkpoint-dir: checkpoints kept, newest first (default: {DEFAULT_CHECKPOINT_KEEP})")
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                       help="log verbosity on stderr (default: %(default)s)")
    limits.add_arguments(serve)
    checkpoint = commands.add_parser(
        "checkpoint", help="have a running server (started with --checkpoint-dir) write a checkpoint now",
        description="Ask the server at ADDRESS to write a checkpoint now, and print its path "
                    "(with several servers, one 'ADDRESS PATH' line each). Exit 0 when every server wrote one.")
    checkpoint.add_argument("address", metavar="ADDRESS",
                            help="host:port of the server; several, joined by commas, for the shards of a model")
    checkpoint.add_argument("--timeout", type=_positive_float, default=600.0, metavar="S",
                            help="seconds to wait for each checkpoint to be written (default: %(default)s)")
    for name, (_, help_text) in CLIENT_COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def _announce(address: str) -> None:
    print(f"optserve listening on {address}", flush=True)


def _checkpoint_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    if args.checkpoint_dir is None:
        given = [flag for flag, value in (("--checkpoint-every", args.checkpoint_every),
                                          ("--checkpoint-keep", args.checkpoint_keep)) if value is not None]
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
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(args.host, args.port, args.device, grace=args.grace, on_listening=_announce,
                     sync_timeout_s=args.sync_timeout, max_request_bytes=args.max_request_bytes,
                     apply_threads=args.apply_threads, limits=limits.from_arguments(args), **checkpoint_options)
    except (OptserveError, OSError) as exc:
        # Startup problems (busy port, no GPU) are the operator's to fix: a message, not a traceback.
        print(f"optserve serve: error: {exc}", file=sys.stderr, flush=True)
        return 1


def run_checkpoint(args: argparse.Namespace) -> int:
    """``optserve checkpoint ADDRESS``: one checkpoint per server; prints where each went."""
    from optserve.client.client import Client, OptserveError as ClientError, parse_addresses

    try:
        addresses = parse_addresses(args.address)
    except ValueError as error:
        print(f"optserve checkpoint: error: {error}", file=sys.stderr)
        return 2
    status = 0
    for address in addresses:
        try:
            with Client(address, timeout=args.timeout) as client:
                path, models = client.checkpoint()
        except ClientError as error:
            print(f"optserve checkpoint: {address}: {error.code}: {error.message}", file=sys.stderr, flush=True)
            status = 1
            continue
        print(path if len(addresses) == 1 else f"{address} {path}", flush=True)
        print(f"optserve checkpoint: {address}: {models} model{'s' if models != 1 else ''} in {path}",
              file=sys.stderr, flush=True)
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
    return run_serve(args, parser)


if __name__ == "__main__":
    sys.exit(main())
