"""``optserve delete ADDRESS MODEL [--force]``: delete a model (a finished training job) from a server.

A model in use is refused, and left unchanged, unless ``--force``: one with workers
parked in a synchronous step (they would lose the step, and their gradients pushed
for it) or with any call on it in flight. The server checks this atomically with the
deletion. A job between two steps (a worker computing its next gradients) is not in
use: deleting it makes that worker's next call fail with FAILED_PRECONDITION (model
deleted), so look at its last activity first (``optserve inspect``; this command
prints it too).

With the shards of a sharded model (``h1:50051,h2:50051``) every piece is deleted;
the in-use check is then made on the listing before deleting, not atomically.

Exit status: 0 deleted; 1 no such model, or refused because it is in use, or another
error; 2 no server reachable at ADDRESS.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from optserve.client.client import (
    Client,
    FailedPreconditionError,
    ModelInfo,
    NotFoundError,
    OptserveError,
    UnavailableError,
)

EXIT_REFUSED = 1
EXIT_UNREACHABLE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optserve delete",
        description="Delete a model from a running optserve server; its memory is reused for other models. "
        "A model in use (workers parked in a step, or calls in flight) is refused unless --force.",
    )
    parser.add_argument(
        "address", metavar="ADDRESS", help="host:port of the server; or the shards' addresses joined by commas"
    )
    parser.add_argument("model", metavar="MODEL", help="the model_id to delete")
    parser.add_argument(
        "--force",
        action="store_true",
        help="delete even while in use: workers parked in a step get FAILED_PRECONDITION "
        "and the step in progress is lost",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default 30)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(args.address, timeout=args.timeout, retries=1) as client:
            return _delete(client, args)
    except UnavailableError as error:
        print(
            f"optserve delete: cannot reach a server at {args.address}: {error}\nIs `optserve serve` running there?",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    except NotFoundError as error:
        print(f"optserve delete: {error.message}", file=sys.stderr)
        return EXIT_REFUSED
    except FailedPreconditionError as error:
        print(f"optserve delete: not deleted: {error.message}", file=sys.stderr)
        return EXIT_REFUSED
    except (OptserveError, ValueError) as error:
        print(f"optserve delete: {error}", file=sys.stderr)
        return EXIT_REFUSED


def _delete(client: Client, args) -> int:
    found = client.list_models(args.model)  # NotFoundError names the models the server holds
    if not found:
        raise NotFoundError("NOT_FOUND", f"No model {args.model!r} on {client.address}.")
    model = found[0]
    sharded = getattr(client, "addresses", None) is not None
    if sharded and model.waiting_workers and not args.force:
        raise FailedPreconditionError(
            "FAILED_PRECONDITION",
            f"Model {args.model!r} is in use (workers {model.waiting_workers} wait in step {model.step}); "
            "stop its workers first, or pass --force.",
        )
    deleted = client.delete_model(args.model) if sharded else client.delete_model(args.model, if_idle=not args.force)
    if not deleted:  # deleted by someone else since the listing
        raise NotFoundError("NOT_FOUND", f"No model {args.model!r} on {client.address} (it was just deleted).")
    print(f"Deleted model {args.model!r} from {client.address}: {_describe(model)}.", flush=True)
    return 0


def _describe(model: ModelInfo) -> str:
    parameters = sum(_size(v.shape) for v in model.variables)
    text = (
        f"{model.optimizer}, step {model.step}, iterations {model.iterations}, {len(model.variables)} "
        f"variable{'s' if len(model.variables) != 1 else ''} ({parameters:,} parameters)"
    )
    if model.activity is not None:
        text += f"; last activity: {model.activity.describe_last()}"
    return text


def _size(shape) -> int:
    size = 1
    for dim in shape:
        size *= int(dim)
    return size


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
