"""What every remote optimizer shares, whatever its Keras: the job's arguments and layout checks.

`RemoteOptimizer` (Keras 3, `client/keras_optimizer.py`) and its tf_keras twin
(`client/tf_keras_optimizer.py`) name a training job on a server the same way
and check a worker's variables against it the same way. Nothing here imports
a Keras.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "MODES",
    "check_job_arguments",
    "check_unique_names",
    "check_server_layout",
    "match_variables",
    "check_resume",
    "server_config",
    "job_config",
    "PulledValues",
    "is_int",
    "is_number",
]

MODES = ("sync", "async")


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_job_arguments(model_id, num_workers, worker_index, mode, sync_timeout_s, timeout) -> None:
    """Keras-style eager checks of the arguments that name and shape a job."""
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"`model_id` must be a non-empty string. Received: model_id={model_id!r}")
    if not is_int(num_workers) or num_workers < 1:
        raise ValueError(f"`num_workers` must be an integer >= 1. Received: num_workers={num_workers!r}")
    if not is_int(worker_index) or not 0 <= worker_index < num_workers:
        raise ValueError(
            f"`worker_index` must be an integer in [0, num_workers). "
            f"Received: worker_index={worker_index!r} with num_workers={num_workers}"
        )
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
    if not is_number(sync_timeout_s) or not sync_timeout_s >= 0:
        raise ValueError(
            "`sync_timeout_s` must be a number >= 0 (0: the server's default). "
            f"Received: sync_timeout_s={sync_timeout_s!r}"
        )
    if timeout is not None and (not is_number(timeout) or not timeout > 0):
        raise ValueError(f"`timeout` must be a number > 0 or None. Received: timeout={timeout!r}")


def check_unique_names(names, identified_by: str) -> list[str]:
    """The server knows variables by name: two variables with one name would be one."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    duplicates = sorted(name for name, count in counts.items() if count > 1)
    if duplicates:
        raise ValueError(
            f"The remote optimizer identifies variables by {identified_by}, which must be unique; "
            f"these appear more than once: {duplicates}. Give the layers distinct names."
        )
    return list(names)


def check_server_layout(model_id, info, names, values) -> None:
    """A worker joining a model must have the variables the server holds, in the same order."""
    server = [(v.name, tuple(v.shape)) for v in info.variables]
    local = [(name, tuple(np.shape(values[name]))) for name in names]
    if server != local:
        raise ValueError(
            f"Model {model_id!r} on the server has the variables {server}, but this worker's are "
            f"{local}. Every worker must build the same model (same layer names), or use another `model_id`."
        )


def check_resume(resume) -> None:
    if resume not in (True, False, "auto"):
        raise ValueError(f"`resume` must be True, False or 'auto'. Received: resume={resume!r}")


def match_variables(model_id, info, names, values) -> list[str]:
    """The server's names for this worker's variables, when it joins the model `info` describes.

    Variables match by name when every name agrees. Otherwise, when the worker
    has the same number of variables with the same shapes and dtypes in the
    same order (the same model, auto-named differently: a notebook cell run
    twice, a scratch model built first, a reloaded Sequential), they match by
    position. Anything else is a different model: the error names the first
    variable that differs.
    """
    server = [(v.name, tuple(v.shape), v.dtype) for v in info.variables]
    local = [(name, tuple(np.shape(values[name])), np.asarray(values[name]).dtype.name) for name in names]
    if [entry[0] for entry in server] == list(names):
        return list(names)
    for index, (theirs, ours) in enumerate(zip(server, local)):
        if theirs[1:] != ours[1:]:
            raise ValueError(
                f"Model {model_id!r} on the server is another model: its variable {index} is {theirs[0]!r} "
                f"{list(theirs[1])} {theirs[2]}, this worker's is {ours[0]!r} {list(ours[1])} {ours[2]}. "
                "Build the same model on every worker, delete the old job (`optserve delete ADDRESS "
                f"{model_id}`), or use another `model_id`."
            )
    if len(server) != len(local):
        raise ValueError(
            f"Model {model_id!r} on the server has {len(server)} variables, this worker has {len(local)}. "
            "Build the same model on every worker, delete the old job (`optserve delete ADDRESS "
            f"{model_id}`), or use another `model_id`."
        )
    return [entry[0] for entry in server]


def job_config(optimizer) -> dict:
    """The job entries of a remote optimizer's `get_config()`, the same for both Keras.

    TLS settings are kept as file paths (None when they were given as bytes); the
    token never is, so `model.save` does not store a secret: a loaded model reads
    `OPTSERVE_TOKEN`.
    """
    from optserve.client import security

    tls = optimizer._tls
    return {
        "name": optimizer.name,
        "optimizer": optimizer.wrapped_config,
        "address": optimizer.address,
        "model_id": optimizer.model_id,
        "num_workers": optimizer.num_workers,
        "worker_index": optimizer.worker_index,
        "mode": optimizer.mode,
        "sync_timeout_s": optimizer.sync_timeout_s,
        "timeout": optimizer.timeout,
        "tls": tls.to_config() if isinstance(tls, security.TLSOptions) else tls,
    }


def server_config(class_name: str, config: dict, schedule_module: str = "keras.optimizers.schedules") -> dict:
    """A Keras optimizer's `get_config()` in the serialized form the server reads.

    The instance name stays out: Keras numbers names in creation order ("adam",
    "adam_1"), and the server compares configs to let workers join.
    """
    config = {key: _plain(value) for key, value in config.items() if key != "name"}
    learning_rate = config.get("learning_rate")
    if isinstance(learning_rate, dict) and "class_name" in learning_rate:
        schedule = dict(learning_rate)
        # tf_keras leaves an unnamed schedule's name None; Keras 3 names it by its class.
        schedule_config = {k: v for k, v in schedule.get("config", {}).items() if not (k == "name" and v is None)}
        config["learning_rate"] = {
            "module": schedule_module,
            "registered_name": None,
            **schedule,
            "config": schedule_config,
        }
    return {"module": "keras.optimizers", "class_name": class_name, "config": config, "registered_name": None}


def _plain(value):
    """NumPy scalars (tf_keras keeps the learning rate as np.float32) as JSON-ready Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


class PulledValues:
    """What each model variable held when it last agreed with the server.

    A variable that holds something else before a step was written outside the
    optimizer (`model.set_weights`, `load_weights`, `restore_best_weights`, an
    assignment) and must reach the server before that step. A `token` is a
    cheap stand-in that changes whenever the variable is written (None: compare
    values).
    """

    def __init__(self):
        self._entries: dict[str, tuple[np.ndarray, object]] = {}

    def note(self, name: str, value, token=None) -> None:
        self._entries[name] = (np.asarray(value), token)

    def token(self, name: str):
        return self._entries[name][1]

    def differs(self, name: str, value) -> bool:
        pulled = self._entries[name][0]
        value = np.asarray(value)
        return value.shape != pulled.shape or not np.array_equal(value, pulled, equal_nan=True)

    def changed(self, names, values) -> dict[str, np.ndarray]:
        """{name: a copy of the value} for each value that differs from the one pulled."""
        return {name: np.array(value) for name, value in zip(names, values) if self.differs(name, value)}

    def keep(self, changed) -> None:
        """The server now has `changed` (written back): they are the values to compare with."""
        for name, value in changed.items():
            self._entries[name] = (np.asarray(value), self._entries[name][1])
