"""``optserve demo``: a server and two workers training a small model, end to end.

The parent process starts ``python -m optserve.server serve --port 0`` (unless
``--address`` names a running server), creates a synchronous model, and starts
one worker process per ``--workers``. Each worker draws its own batches of a
synthetic classification task (a fixed random "teacher" network labels random
inputs), computes the cross-entropy gradients of a two-layer MLP in NumPy and
pushes them; the server sums the workers' gradients and applies one Adam step.
Workers report their losses on stdout as JSON lines; the parent draws the
progress and the falling loss, then prints a summary. The exit status is
nonzero when the loss did not fall.

Sharding: ``--address h1:50051,h2:50051`` spreads the model over those servers
(see ``optserve.client.sharded``); ``--shards N`` starts N servers instead of one.

Join mode, for workers in separate processes or containers that share one job:

    optserve demo --address server:50051 --worker-index 0 --num-workers 2 --model-id job --steps 1000

runs worker 0 of 2 in this process. It creates the model or joins the identical
one another worker created, continues from the model's step (so a restarted
worker picks up where the job is), trains until the model reaches ``--steps``,
and leaves the model on the server. It exits 0 when done, and nonzero when the
server stays unreachable after ``--retries`` retries (EXIT_UNAVAILABLE) or on any
other failure, so that a restart policy brings it back.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Literal, overload

import numpy as np

from optserve.client.client import (
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    OptserveError,
    StepMismatchError,
    UnavailableError,
)

INPUTS, HIDDEN, CLASSES = 16, 32, 4
TEACHER_SEED = 1234  # the task: identical in every process
EVAL_SEED = 4321  # held-out batch the parent measures before and after
EVAL_SIZE = 2048
LISTENING = re.compile(r"optserve listening on (\S+:\d+)")
SERVER_START_TIMEOUT_S = 60.0
BAR_WIDTH = 24
SYNC_TIMEOUT_S = 60.0
JOIN_MODEL_ID = "demo"
EXIT_FAILED = 1
EXIT_UNAVAILABLE = 3
# A joined worker pushes a step again after it timed out waiting for another worker
# (which may be restarting); this many times in a row, then it gives up.
MAX_STEP_TIMEOUTS = 10


# --------------------------------------------------------------------------- the model (NumPy)


def teacher() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(TEACHER_SEED)
    return rng.standard_normal((INPUTS, 24)), rng.standard_normal((24, CLASSES))


def make_batch(rng: np.random.Generator, size: int, task=None) -> tuple[np.ndarray, np.ndarray]:
    first, second = task if task is not None else teacher()
    x = rng.standard_normal((size, INPUTS))
    y = np.argmax(np.tanh(x @ first) @ second, axis=1)
    return x.astype(np.float32), y


def initial_params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def glorot(fan_in, fan_out):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32)

    return {
        "dense_1/kernel": glorot(INPUTS, HIDDEN),
        "dense_1/bias": np.zeros(HIDDEN, np.float32),
        "dense_2/kernel": glorot(HIDDEN, CLASSES),
        "dense_2/bias": np.zeros(CLASSES, np.float32),
    }


@overload
def loss_and_grads(
    params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, with_grads: Literal[True] = True
) -> tuple[float, dict[str, np.ndarray]]: ...


@overload
def loss_and_grads(
    params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, with_grads: Literal[False]
) -> tuple[float, None]: ...


def loss_and_grads(
    params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, with_grads: bool = True
) -> tuple[float, dict[str, np.ndarray] | None]:
    """Mean softmax cross-entropy of a tanh MLP and its gradients, by hand."""
    hidden = np.tanh(x @ params["dense_1/kernel"] + params["dense_1/bias"])
    logits = hidden @ params["dense_2/kernel"] + params["dense_2/bias"]
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(y)), y].mean())
    if not with_grads:
        return loss, None
    d_logits = np.exp(log_probs)
    d_logits[np.arange(len(y)), y] -= 1.0
    d_logits /= len(y)
    d_hidden = (d_logits @ params["dense_2/kernel"].T) * (1.0 - hidden**2)
    grads = {
        "dense_1/kernel": x.T @ d_hidden,
        "dense_1/bias": d_hidden.sum(axis=0),
        "dense_2/kernel": hidden.T @ d_logits,
        "dense_2/bias": d_logits.sum(axis=0),
    }
    return loss, {name: g.astype(np.float32) for name, g in grads.items()}


def eval_loss(params: dict[str, np.ndarray]) -> float:
    x, y = make_batch(np.random.default_rng(EVAL_SEED), EVAL_SIZE)
    return loss_and_grads(params, x, y, with_grads=False)[0]


# --------------------------------------------------------------------------- worker process


def run_worker(args) -> int:
    task = teacher()
    rng = np.random.default_rng(args.seed + 1 + args.worker)
    with Client(args.address) as client:
        _, params = client.pull(args.model_id)
        for _ in range(args.steps):
            x, y = make_batch(rng, args.batch_size, task)
            loss, grads = loss_and_grads(params, x, y)
            # The server sums the workers' gradients; scaling each by 1/N makes the
            # sum the gradient of the mean loss over the global batch.
            grads = {name: g / args.workers for name, g in grads.items()}
            result, params = client.push_pull(args.model_id, grads, worker_index=args.worker)
            print(json.dumps({"worker": args.worker, "step": result.step, "loss": loss}), flush=True)
    return 0


# --------------------------------------------------------------------------- join mode


def run_joined_worker(args) -> int:
    """Worker ``--worker-index`` of ``--num-workers``, in this process; see the module docstring."""
    problem = _join_mode_problem(args)
    if problem:
        print(f"optserve demo: {problem}", file=sys.stderr)
        return 2
    try:
        optimizer = optimizer_config(args.optimizer, args.learning_rate)
    except ValueError as error:
        print(f"optserve demo: --optimizer is neither a name nor valid JSON ({error}).", file=sys.stderr)
        return 2
    model_id = args.model_id or JOIN_MODEL_ID
    me = f"worker {args.worker_index}/{args.num_workers}"
    try:
        with Client(args.address, retries=args.retries) as client:
            info = client.create_model(
                model_id,
                optimizer,
                initial_params(args.seed),
                num_workers=args.num_workers,
                mode="sync",
                sync_timeout_s=SYNC_TIMEOUT_S,
            )
            # Restarted, or joining late: go on from the job's step and values.
            step = client.resync(model_id, args.worker_index)
            _, params = client.pull(model_id)
            print(
                f"{me}: {'created' if info.created else 'joined'} model {model_id!r} on {client.address}, "
                f"{info.optimizer}; step {step} of {args.steps}.",
                flush=True,
            )
            losses = train_joined(client, args, model_id, params, step, me)
            if losses and args.worker_index == 0:
                save_final_checkpoint(client, me)
    except UnavailableError as error:
        print(
            f"optserve demo: {me}: no server at {args.address} after {args.retries} retries: {error}", file=sys.stderr
        )
        return EXIT_UNAVAILABLE
    except (OptserveError, ValueError) as error:
        print(f"optserve demo: {me}: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"\noptserve demo: {me}: interrupted; the model stays on the server.", file=sys.stderr)
        return 130
    if losses:
        print(f"{me}: done at step {args.steps}; loss {losses[0]:.4f} -> {losses[-1]:.4f}.", flush=True)
    else:
        print(f"{me}: the model is already at step {args.steps}; nothing to do.", flush=True)
    return 0


def save_final_checkpoint(client: Client, me: str) -> None:
    """Make the job's last steps durable before the workers exit.

    Finished workers do not come back: if the server died after the last step
    and before its next periodic checkpoint, a restored job would wait forever
    for them. A server without --checkpoint-dir answers FAILED_PRECONDITION.
    """
    try:
        path, _ = client.checkpoint()
    except FailedPreconditionError:
        return
    print(f"{me}: final state checkpointed at {path}.", flush=True)


def _join_mode_problem(args) -> str | None:
    if args.num_workers is None:
        return "--worker-index needs --num-workers (the number of workers of the job)"
    if not 0 <= args.worker_index < args.num_workers:
        return f"--worker-index must be in [0, {args.num_workers}). Received: {args.worker_index}"
    if not args.address:
        return "--worker-index needs --address (the server, or the shards, the workers share)"
    if args.workers not in (None, 1):
        return f"--worker-index runs one worker in this process; --workers must be 1. Received: {args.workers}"
    return None


def train_joined(client: Client, args, model_id: str, params: dict, step: int, me: str) -> list[float]:
    """Push until the model reaches ``args.steps``; returns this worker's losses."""
    task = teacher()
    every = max(1, args.steps // 10)
    losses: list[float] = []
    timeouts = 0
    while step < args.steps:
        # Batches depend on (seed, worker, step) only: a restarted worker sees the same data.
        rng = np.random.default_rng((args.seed, args.worker_index, step))
        loss, grads = loss_and_grads(params, *make_batch(rng, args.batch_size, task))
        grads = {name: g / args.num_workers for name, g in grads.items()}
        try:
            result, params = client.push_pull(model_id, grads, worker_index=args.worker_index, step=step)
        except StepMismatchError:
            # The job moved on without this push (or was restored from a checkpoint): follow it.
            step = client.resync(model_id, args.worker_index)
            _, params = client.pull(model_id)
            continue
        except DeadlineExceededError:
            timeouts += 1
            if timeouts > MAX_STEP_TIMEOUTS:
                raise
            print(f"{me}: step {step} timed out waiting for the other workers; pushing it again.", flush=True)
            continue
        timeouts = 0
        step = result.step
        losses.append(loss)
        if step % every == 0 or step == args.steps:
            print(f"{me}: step {step}/{args.steps}  loss {loss:.4f}", flush=True)
    return losses


# --------------------------------------------------------------------------- server process


class ServerProcess:
    """``python -m optserve.server serve --port 0`` as a child, and its address."""

    def __init__(self, device: str):
        command = [
            sys.executable,
            "-m",
            "optserve.server",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            device,
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_child_env()
        )
        self.output: deque[str] = deque(maxlen=40)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.address = self._wait_for_address()

    def _drain(self) -> None:
        for line in self.process.stdout or ():
            self.output.append(line.rstrip("\n"))
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for_address(self) -> str:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            match = LISTENING.search(line)
            if match:
                return match.group(1)
        self.stop()
        log = "\n".join(self.output) or "(no output)"
        raise RuntimeError(f"The optserve server did not start. Its output:\n{log}")

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # graceful: finish in-flight calls, then exit
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------- workers and progress


class Progress:
    """Plain-text progress: a bar line at every tenth of the run (and a live line on a TTY)."""

    def __init__(self, steps: int, stream=None):
        self.steps = steps
        self.stream = stream if stream is not None else sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, steps // 10)
        self.first_step_at: float | None = None  # steady-state timing leaves out worker start-up
        self.last_step_at: float | None = None

    def update(self, done: int, loss: float) -> None:
        now = time.monotonic()
        if self.first_step_at is None:
            self.first_step_at = now
        self.last_step_at = now
        filled = int(BAR_WIDTH * done / self.steps)
        line = (
            f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {100 * done // self.steps:3d}%  "
            f"step {done:>{len(str(self.steps))}}/{self.steps}  loss {loss:.4f}"
        )
        milestone = done == 1 or done == self.steps or done % self.every == 0
        if self.live:
            self.stream.write("\r" + line + ("\n" if milestone else ""))
        elif milestone:
            self.stream.write(line + "\n")
        self.stream.flush()


def start_workers(args, address: str, model_id: str) -> list[subprocess.Popen]:
    workers = []
    for index in range(args.workers):
        command = [
            sys.executable,
            "-m",
            "optserve.client.demo",
            "--worker",
            str(index),
            "--address",
            address,
            "--model-id",
            model_id,
            "--steps",
            str(args.steps),
            "--workers",
            str(args.workers),
            "--batch-size",
            str(args.batch_size),
            "--seed",
            str(args.seed),
        ]
        workers.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env())
        )
    return workers


def follow_workers(workers: list[subprocess.Popen], steps: int, progress: Progress) -> list[float]:
    """Mean loss per step across workers, drawn as it arrives; raises if a worker fails."""
    events: queue.Queue = queue.Queue()
    errors: dict[int, list[str]] = {i: [] for i in range(len(workers))}
    for index, worker in enumerate(workers):
        threading.Thread(target=_read_worker, args=(index, worker, events, errors[index]), daemon=True).start()
    losses_by_step: dict[int, list[float]] = {}
    reports = [0] * len(workers)  # each worker reports its steps in order
    mean_losses: list[float] = []
    running = len(workers)
    while running:
        index, event = events.get()
        if event is None:
            running -= 1
            if workers[index].wait() != 0:
                detail = "\n".join(errors[index][-20:]) or "(no output)"
                raise RuntimeError(f"Worker {index} failed (exit {workers[index].returncode}):\n{detail}")
            continue
        losses_by_step.setdefault(reports[index], []).append(event["loss"])
        reports[index] += 1
        while len(losses_by_step.get(len(mean_losses), ())) == len(workers):
            mean_losses.append(float(np.mean(losses_by_step.pop(len(mean_losses)))))
            progress.update(len(mean_losses), mean_losses[-1])
    return mean_losses


def _read_worker(index: int, worker: subprocess.Popen, events: queue.Queue, errors: list[str]) -> None:
    threading.Thread(
        target=lambda: errors.extend(line.rstrip("\n") for line in worker.stderr or ()), daemon=True
    ).start()
    for line in worker.stdout or ():
        try:
            events.put((index, json.loads(line)))
        except ValueError:
            errors.append(line.rstrip("\n"))
    events.put((index, None))


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=5)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


# --------------------------------------------------------------------------- the demo


def optimizer_config(name: str, learning_rate: float):
    """``--optimizer``: a Keras name ("adam", "SGD", ...) or a JSON config."""
    if name.lstrip().startswith("{"):
        return json.loads(name)
    return {"class_name": name, "config": {"learning_rate": learning_rate}}


def run_demo(args) -> int:
    started = time.monotonic()
    try:
        optimizer = optimizer_config(args.optimizer, args.learning_rate)
    except ValueError as error:
        print(f"optserve demo: --optimizer is neither a name nor valid JSON ({error}).", file=sys.stderr)
        return 2
    args.workers = args.workers or 2
    servers: list[ServerProcess] = []
    workers: list[subprocess.Popen] = []
    try:
        if args.address is None:
            print(
                f"Starting {args.shards} optserve server{'s' if args.shards > 1 else ''} (device {args.device}) ...",
                flush=True,
            )
            for _ in range(args.shards):
                servers.append(ServerProcess(args.device))
    except RuntimeError as error:
        for server in servers:
            server.stop()
        print(f"optserve demo: {error}", file=sys.stderr)
        return 1
    address = args.address or ",".join(server.address for server in servers)
    model_id = args.model_id or f"demo-{os.getpid()}"
    try:
        with Client(address) as client:
            params = initial_params(args.seed)
            info = client.create_model(
                model_id, optimizer, params, num_workers=args.workers, mode="sync", sync_timeout_s=SYNC_TIMEOUT_S
            )
            initial = eval_loss(params)
            where = (
                f"Server {address}"
                if "," not in address
                else f"{address.count(',') + 1} shards {address} (plan {info.fingerprint})"
            )
            print(
                f"{where}: model {model_id!r}, {info.optimizer} "
                f"(learning rate {info.learning_rate:g}), {args.workers} workers in sync mode, "
                f"{sum(p.size for p in params.values()):,} parameters."
            )
            print(
                f"Training {args.steps} steps, batch {args.batch_size} per worker; "
                f"held-out loss before training: {initial:.4f}\n",
                flush=True,
            )
            train_started = time.monotonic()
            workers = start_workers(args, address, model_id)
            progress = Progress(args.steps)
            mean_losses = follow_workers(workers, args.steps, progress)
            train_seconds = time.monotonic() - train_started
            state, final_params = client.pull(model_id)
            final = eval_loss(final_params)
            if info.created:  # a model the demo joined is someone else's to delete
                client.delete_model(model_id)
    except (OptserveError, RuntimeError) as error:
        print(f"optserve demo: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\noptserve demo: interrupted; stopping the workers and the server.", file=sys.stderr)
        return 130
    finally:
        stop_workers(workers)
        server_statuses = [server.stop() for server in servers]
    print(
        f"\nDone: {state.step} synchronous steps ({state.iterations} optimizer updates) "
        f"in {train_seconds:.1f} s, {time.monotonic() - started:.1f} s in all."
    )
    if args.steps > 1 and progress.first_step_at is not None and progress.last_step_at is not None:
        steady = (progress.last_step_at - progress.first_step_at) / (args.steps - 1)
        print(
            f"Steady state: {1000 * steady:.1f} ms per step ({1 / max(steady, 1e-9):.0f} steps/s) "
            f"with {args.workers} workers."
        )
    print(f"Training loss:  {mean_losses[0]:.4f} -> {mean_losses[-1]:.4f}")
    print(f"Held-out loss:  {initial:.4f} -> {final:.4f}")
    if not final < initial:
        print("The loss did not fall.", file=sys.stderr)
        return 1
    print("The loss fell: the server applied the workers' summed gradients.")
    for server, status in zip(servers, server_statuses):
        if status != 0:
            print(f"The server exited with status {status}:\n" + "\n".join(server.output), file=sys.stderr)
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optserve demo",
        description="Start a server and workers that train a small NumPy model against it; or, with "
        "--worker-index, run one worker of a job shared with other processes.",
    )
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=200,
        help="synchronous steps (default 200); in join mode, the step the job trains to",
    )
    parser.add_argument(
        "--workers", type=_positive_int, default=None, help="worker processes (default 2); 1 in join mode"
    )
    parser.add_argument("--optimizer", default="adam", help="Keras optimizer name or JSON config (default adam)")
    parser.add_argument(
        "--learning-rate", type=float, default=0.01, help="learning rate when --optimizer is a name (default 0.01)"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="examples per worker per step")
    parser.add_argument(
        "--address",
        help="use the server at host:port instead of starting one; several "
        "addresses joined by commas shard the model over those servers",
    )
    parser.add_argument(
        "--shards",
        type=_positive_int,
        default=1,
        help="without --address: servers to start and shard the model over (default 1)",
    )
    parser.add_argument("--device", default="auto", help="device of the server the demo starts (auto|cpu|gpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the workers' data")
    parser.add_argument(
        "--model-id", help=f"model name on the server (default demo-<pid>; {JOIN_MODEL_ID!r} in join mode)"
    )
    parser.add_argument(
        "--worker-index",
        type=_non_negative_int,
        metavar="N",
        help="join mode: run worker N of --num-workers in this process, against --address",
    )
    parser.add_argument(
        "--num-workers",
        type=_positive_int,
        metavar="M",
        help="join mode: workers of the job (each started with its own --worker-index)",
    )
    parser.add_argument(
        "--retries",
        type=_non_negative_int,
        default=5,
        help="retries of a call the server does not answer (default 5); "
        f"join mode then exits with status {EXIT_UNAVAILABLE}",
    )
    # Internal: the parent starts each worker as `python -m optserve.client.demo --worker I ...`.
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        if not args.address or not args.model_id:
            raise SystemExit("optserve demo: --worker needs --address and --model-id")
        return run_worker(args)
    if args.worker_index is not None:
        return run_joined_worker(args)
    if args.num_workers is not None:
        print(
            "optserve demo: --num-workers is for join mode; give --worker-index too "
            "(or use --workers to start that many local worker processes).",
            file=sys.stderr,
        )
        return 2
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
