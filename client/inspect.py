"""``optserve inspect ADDRESS [MODEL] [--json]``: what a running server holds.

Without MODEL: one row per model (optimizer, mode, workers, step, iterations,
learning rate). With MODEL: the model's settings and a row per variable (shape,
dtype, L2 norm, slots); ``--slots`` also fetches every slot and shows its norm.
``--json`` prints the same information as JSON for scripts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Sequence

import numpy as np

from optserve.client.client import Client, ModelInfo, NotFoundError, OptserveError, UnavailableError

EXIT_UNREACHABLE = 2
EXIT_NOT_FOUND = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optserve inspect",
        description="Show the models a running optserve server holds.",
    )
    parser.add_argument("address", help="server address, host:port")
    parser.add_argument("model", nargs="?", help="show this model's variables and slots")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--slots", action="store_true",
                        help="with MODEL: also fetch every slot and show its shape and L2 norm")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server (default 10)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(args.address, timeout=args.timeout, retries=1) as client:
            if args.model:
                return _show_model(client, args)
            return _show_models(client, args)
    except UnavailableError as error:
        print(f"optserve inspect: cannot reach a server at {args.address}: {error}\n"
              "Is `optserve serve` running there?", file=sys.stderr)
        return EXIT_UNREACHABLE
    except NotFoundError as error:
        print(f"optserve inspect: {error}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (OptserveError, ValueError) as error:
        print(f"optserve inspect: {error}", file=sys.stderr)
        return 1


def _show_models(client: Client, args) -> int:
    models = client.list_models()
    if args.json:
        print(json.dumps({"address": client.address, "models": [_model_json(m) for m in models]}, indent=2))
        return 0
    if not models:
        print(f"No models on {client.address}.")
        return 0
    rows = [
        [m.model_id, m.optimizer, m.mode, str(m.num_workers), str(m.step), str(m.iterations),
         _number(m.learning_rate), str(len(m.variables)), _count(sum(_size(v.shape) for v in m.variables))]
        for m in models
    ]
    print(f"{len(models)} model{'s' if len(models) != 1 else ''} on {client.address}\n")
    print(format_table(["MODEL", "OPTIMIZER", "MODE", "WORKERS", "STEP", "ITERATIONS", "LEARNING RATE",
                        "VARIABLES", "PARAMETERS"], rows))
    return 0


def _show_model(client: Client, args) -> int:
    found = client.list_models(args.model, with_stats=True)
    if not found:
        raise NotFoundError("NOT_FOUND", f"Model {args.model!r} not found on {client.address}.")
    model = found[0]
    slot_tensors = client.get_weights(args.model).slots if args.slots else None
    if args.json:
        data = _model_json(model)
        if slot_tensors is not None:
            data["slot_stats"] = {
                name: {slot: {"shape": list(a.shape), "dtype": a.dtype.name, "norm": _norm(a)}
                       for slot, a in per_var.items()}
                for name, per_var in slot_tensors.items()
            }
        print(json.dumps(data, indent=2))
        return 0
    print(_model_header(model))
    print()
    print(format_table(["VARIABLE", "SHAPE", "DTYPE", "L2 NORM", "SLOTS"], _variable_rows(model, slot_tensors)))
    return 0


def _model_header(model: ModelInfo) -> str:
    sync = model.mode
    if model.mode == "sync":
        timeout = f"{model.sync_timeout_s:g} s" if model.sync_timeout_s else "server default"
        sync += f", {model.num_workers} worker{'s' if model.num_workers != 1 else ''}, " \
                f"timeout {timeout} ({model.timeout_policy})"
    else:
        sync += f", {model.num_workers} worker{'s' if model.num_workers != 1 else ''}"
    lines = [
        ("model", model.model_id),
        ("optimizer", _optimizer_summary(model)),
        ("mode", sync),
        ("step", str(model.step)),
        ("iterations", str(model.iterations)
         + (f" (raw {model.raw_iterations})" if model.raw_iterations != model.iterations else "")),
        ("learning rate", _number(model.learning_rate)),
        ("parameters", _count(sum(_size(v.shape) for v in model.variables))),
    ]
    if model.scalars:
        lines.append(("scalars", ", ".join(f"{k}={_number(v)}" for k, v in model.scalars.items())))
    if model.waiting_workers:
        lines.append(("waiting", "workers " + ", ".join(map(str, model.waiting_workers)) + " pushed this step"))
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


def _variable_rows(model: ModelInfo, slot_tensors) -> list[list[str]]:
    rows = []
    for variable in model.variables:
        rows.append([variable.name, _shape(variable.shape), variable.dtype,
                     _number(variable.norm) if variable.norm is not None else "-",
                     ", ".join(variable.slots) or "-"])
        if slot_tensors is None:
            continue
        for slot, array in slot_tensors.get(variable.name, {}).items():
            rows.append([f"  /{slot}", _shape(array.shape), array.dtype.name, _number(_norm(array)), ""])
    return rows


def _model_json(model: ModelInfo) -> dict:
    data = dataclasses.asdict(model)
    for variable in data["variables"]:
        variable["shape"] = list(variable["shape"])
    data.pop("created")
    return data


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; numbers would be ragged otherwise."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [header, *rows]]
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
