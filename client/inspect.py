"""``optserve inspect ADDRESS [MODEL] [--json]``: what a running server holds.

Without MODEL: one row per model (optimizer, mode, workers, step, iterations,
learning rate, last activity). With MODEL: the model's settings, who created it
and when, its last activity, and a row per variable (shape, dtype, L2 norm,
slots); ``--slots`` also fetches every slot and shows its norm.
``--json`` prints the same information as JSON for scripts.

``ADDRESS`` may list the shards of a sharded deployment, ``h1:50051,h2:50051``
(in the order the workers use). Models are then shown whole, with their
placement: which variable, or which rows of a split one, lives on which shard,
the bytes each shard holds and the imbalance (largest shard over the mean);
``--json`` adds the full plan.

``--watch`` refreshes a live table instead (``optserve.client.watch``): step rate,
push latency, waiting workers, learning rate, iterations, update and variable norms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence

import numpy as np

from optserve.client import security
from optserve.client.activity import format_time
from optserve.client.client import Client, ModelInfo, NotFoundError, OptserveError, UnavailableError
from optserve.client.sharded import ShardedModelInfo

EXIT_UNREACHABLE = 2
EXIT_NOT_FOUND = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optserve inspect",
        description="Show the models a running optserve server holds.",
    )
    parser.add_argument("address", help="server address, host:port; or the shards' addresses joined by commas")
    parser.add_argument("model", nargs="?", help="show this model's variables and slots")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument(
        "--slots", action="store_true", help="with MODEL: also fetch every slot and show its shape and L2 norm"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server (default 10)")
    security.add_connection_arguments(parser)
    parser.add_argument(
        "--watch",
        action="store_true",
        help="refresh a live table (step rate, push latency, waiting workers, learning rate, "
        "iterations, update and variable norms) until Ctrl-C",
    )
    parser.add_argument(
        "--interval",
        type=_positive_float,
        default=2.0,
        metavar="S",
        help="with --watch: seconds between refreshes (default 2)",
    )
    parser.add_argument(
        "--count",
        type=_positive_int,
        default=None,
        metavar="N",
        help="with --watch: stop after N refreshes (default: run until Ctrl-C)",
    )
    return parser


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.watch:
        return _watch(args, parser)
    if args.count is not None:
        parser.error("--count needs --watch")
    try:
        with Client(args.address, timeout=args.timeout, retries=1, **security.connection_options(args)) as client:
            if args.model:
                return _show_model(client, args)
            return _show_models(client, args)
    except UnavailableError as error:
        print(
            f"optserve inspect: cannot reach a server at {args.address}: {error}\nIs `optserve serve` running there?",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    except NotFoundError as error:
        print(f"optserve inspect: {error}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (OptserveError, ValueError) as error:
        print(f"optserve inspect: {error}", file=sys.stderr)
        return 1


def _watch(args, parser) -> int:
    from optserve.client.client import parse_addresses
    from optserve.client.watch import watch

    if args.json or args.slots:
        parser.error("--watch shows a table; it does not combine with --json or --slots")
    try:
        addresses = parse_addresses(args.address)
    except ValueError as error:
        parser.error(str(error))
    return watch(
        addresses,
        model_id=args.model or "",
        interval=args.interval,
        count=args.count,
        timeout=args.timeout,
        **security.connection_options(args),
    )


def _show_models(client: Client, args) -> int:
    models = client.list_models()
    if args.json:
        data = {"address": client.address, "models": [_model_json(m) for m in models]}
        addresses = getattr(client, "addresses", None)
        if addresses is not None:
            data["shards"] = list(addresses)
        print(json.dumps(data, indent=2))
        return 0
    if not models:
        print(f"No models on {client.address}.")
        return 0
    rows = [
        [
            m.model_id,
            m.optimizer,
            m.mode,
            str(m.num_workers),
            str(m.step),
            str(m.iterations),
            _number(m.learning_rate),
            str(len(m.variables)),
            _count(sum(_size(v.shape) for v in m.variables)),
            m.activity.describe_last() if m.activity is not None else "-",
        ]
        for m in models
    ]
    header = [
        "MODEL",
        "OPTIMIZER",
        "MODE",
        "WORKERS",
        "STEP",
        "ITERATIONS",
        "LEARNING RATE",
        "VARIABLES",
        "PARAMETERS",
        "LAST ACTIVITY",
    ]
    sharded = [m for m in models if isinstance(m, ShardedModelInfo)]
    if sharded:
        header += ["PLAN", "IMBALANCE"]
        for row, model in zip(rows, sharded):
            row += [model.fingerprint, f"{model.plan.imbalance():.3f}"]
    print(f"{len(models)} model{'s' if len(models) != 1 else ''} on {_where(client)}\n")
    print(format_table(header, rows))
    return 0


def _where(client: Client) -> str:
    addresses = getattr(client, "addresses", None)
    if addresses is None:
        return client.address
    return f"{len(addresses)} shards ({', '.join(addresses)})"


def _show_model(client: Client, args) -> int:
    found = client.list_models(args.model, with_stats=True)
    if not found:
        raise NotFoundError(f"Model {args.model!r} not found on {client.address}.")
    model = found[0]
    slot_tensors = client.get_weights(args.model).slots if args.slots else None
    if args.json:
        data = _model_json(model)
        if slot_tensors is not None:
            data["slot_stats"] = {
                name: {
                    slot: {"shape": list(a.shape), "dtype": a.dtype.name, "norm": _norm(a)}
                    for slot, a in per_var.items()
                }
                for name, per_var in slot_tensors.items()
            }
        print(json.dumps(data, indent=2))
        return 0
    print(_model_header(model))
    print()
    if isinstance(model, ShardedModelInfo):
        print(
            format_table(["SHARD", "ADDRESS", "MODEL ON SHARD", "STEP", "PIECES", "BYTES", "SHARE"], _shard_rows(model))
        )
        print()
        print(
            format_table(
                ["VARIABLE", "SHAPE", "DTYPE", "L2 NORM", "SLOTS", "SHARDS"], _variable_rows(model, slot_tensors)
            )
        )
        return 0
    print(format_table(["VARIABLE", "SHAPE", "DTYPE", "L2 NORM", "SLOTS"], _variable_rows(model, slot_tensors)))
    return 0


def _model_header(model: ModelInfo) -> str:
    sync = model.mode
    if model.mode == "sync":
        timeout = f"{model.sync_timeout_s:g} s" if model.sync_timeout_s else "server default"
        sync += (
            f", {model.num_workers} worker{'s' if model.num_workers != 1 else ''}, "
            f"timeout {timeout} ({model.timeout_policy})"
        )
    else:
        sync += f", {model.num_workers} worker{'s' if model.num_workers != 1 else ''}"
    lines = [
        ("model", model.model_id),
        ("optimizer", _optimizer_summary(model)),
        ("mode", sync),
        ("step", str(model.step)),
        (
            "iterations",
            str(model.iterations)
            + (f" (raw {model.raw_iterations})" if model.raw_iterations != model.iterations else ""),
        ),
        ("learning rate", _number(model.learning_rate) + _schedule_summary(model.learning_rate_schedule)),
        ("parameters", _count(sum(_size(v.shape) for v in model.variables))),
    ]
    if model.scalars:
        lines.append(("scalars", ", ".join(f"{k}={_number(v)}" for k, v in model.scalars.items())))
    if model.activity is not None:
        lines.append(("created by", model.activity.describe_creator()))
        lines.append(
            ("last activity", f"{model.activity.describe_last()} ({format_time(model.activity.last_activity_unix_s)})")
        )
    if model.waiting_workers:
        lines.append(("waiting", "workers " + ", ".join(map(str, model.waiting_workers)) + " pushed this step"))
    if isinstance(model, ShardedModelInfo):
        plan = model.plan
        split = plan.split_variables()
        lines.append(
            (
                "placement",
                f"{plan.num_shards} shards, plan {model.fingerprint}, imbalance "
                f"{plan.imbalance():.3f} (largest shard / mean), "
                + (
                    f"{len(split)} variable{'s' if len(split) != 1 else ''} split by rows"
                    if split
                    else "no variable split"
                ),
            )
        )
    width = max(len(key) for key, _ in lines)
    return "\n".join(f"{key + ':':<{width + 1}} {value}" for key, value in lines)


def _optimizer_summary(model: ModelInfo) -> str:
    config = model.optimizer_config
    inner = config.get("config") if isinstance(config, dict) else None
    if not isinstance(inner, dict):
        return model.optimizer
    shown = []
    for key, value in inner.items():
        # Unset options (None / False) and the EMA settings of an optimizer without EMA are noise.
        if key in ("name", "learning_rate") or value is None or value is False or isinstance(value, (dict, list)):
            continue
        if key.startswith("ema_") and not inner.get("use_ema"):
            continue
        shown.append(f"{key}={_number(value) if isinstance(value, float) else value}")
    return f"{model.optimizer}({', '.join(shown)})" if shown else model.optimizer


def _schedule_summary(schedule) -> str:
    """`` (ExponentialDecay(decay_rate=0.5, ...))`` for a rate that follows a schedule."""
    if not isinstance(schedule, dict):
        return ""
    config = schedule.get("config")
    if not isinstance(config, dict):
        config = {}
    shown = ", ".join(
        f"{k}={_number(v) if isinstance(v, float) else v}"
        for k, v in config.items()
        if k != "name" and v is not None and not isinstance(v, (dict, list))
    )
    return f" ({schedule.get('class_name', '?')}({shown}))"


def _shard_rows(model: ShardedModelInfo) -> list[list[str]]:
    loads = model.plan.loads()
    total = sum(loads) or 1
    rows = []
    for index, (address, info, load) in enumerate(zip(model.addresses, model.shards, loads)):
        rows.append(
            [
                str(index),
                address,
                info.model_id if info is not None else "-",
                str(info.step) if info is not None else "-",
                str(len(model.plan.shards[index])),
                _count(load),
                f"{100 * load / total:.1f}%",
            ]
        )
    return rows


def _placement(model: ModelInfo, name: str) -> list[str]:
    """``["1"]`` for a whole variable on shard 1; ``["0[0:500]", "2[500:1000]"]`` for a split one."""
    if not isinstance(model, ShardedModelInfo):
        return []
    located = model.plan.locate(name)
    if len(located) == 1:
        return [str(located[0][0])]
    return [f"{shard}[{piece.row_start}:{piece.row_stop}]" for shard, piece in located]


def _variable_rows(model: ModelInfo, slot_tensors) -> list[list[str]]:
    rows = []
    for variable in model.variables:
        rows.append(
            [
                variable.name,
                _shape(variable.shape),
                variable.dtype,
                _number(variable.norm) if variable.norm is not None else "-",
                ", ".join(variable.slots) or "-",
                *([" ".join(_placement(model, variable.name))] if isinstance(model, ShardedModelInfo) else []),
            ]
        )
        if slot_tensors is None:
            continue
        for slot, array in slot_tensors.get(variable.name, {}).items():
            rows.append(
                [
                    f"  /{slot}",
                    _shape(array.shape),
                    array.dtype.name,
                    _number(_norm(array)),
                    "",
                    *([""] if isinstance(model, ShardedModelInfo) else []),
                ]
            )
    return rows


def _model_json(model: ModelInfo) -> dict:
    data = {field.name: getattr(model, field.name) for field in dataclasses.fields(ModelInfo)}
    data["variables"] = [dataclasses.asdict(variable) for variable in model.variables]
    for variable in data["variables"]:
        variable["shape"] = list(variable["shape"])
    data.pop("created")
    if model.activity is not None:
        data["activity"] = dataclasses.asdict(model.activity)
    data["generation"] = dataclasses.asdict(model.generation) if model.generation is not None else None
    if isinstance(model, ShardedModelInfo):
        data["placement"] = _placement_json(model)
    return data


def _placement_json(model: ShardedModelInfo) -> dict:
    plan = model.plan
    return {
        "fingerprint": plan.fingerprint(),
        "num_shards": plan.num_shards,
        "imbalance": plan.imbalance(),
        "split_variables": plan.split_variables(),
        "shards": [
            {
                "index": index,
                "address": address,
                "model_id": info.model_id if info is not None else None,
                "step": info.step if info is not None else None,
                "iterations": info.iterations if info is not None else None,
                "bytes": load,
                "parts": [piece.part_name for piece in pieces],
            }
            for index, (address, info, load, pieces) in enumerate(
                zip(model.addresses, model.shards, plan.loads(), plan.shards)
            )
        ],
        "plan": plan.to_dict(),
    }


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; numbers would be ragged otherwise."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _norm(array: np.ndarray) -> float:
    return float(np.linalg.norm(array.astype(np.float64).reshape(-1)))


def _size(shape) -> int:
    return int(math.prod(shape))


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _number(value: float) -> str:
    return f"{value:.6g}"


def _count(n: int) -> str:
    return f"{n:,}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
