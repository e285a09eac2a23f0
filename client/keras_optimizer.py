"""``RemoteOptimizer``: a Keras 3 optimizer whose state lives on an optserve server.

Users change one line of their Keras program::

    opt = RemoteOptimizer(keras.optimizers.Adam(learning_rate=0.01), "localhost:50051")
    model.compile(loss="categorical_crossentropy", optimizer=opt)
    model.fit(x, y, epochs=2)

Each training step is one ``push_pull`` round trip: the gradients go to the
server, which applies the wrapped optimizer's update (Keras-identical math) and
answers with the new variable values, which are written into the Keras
variables. The slots (momenta, velocities, ...) never leave the server during
training; ``iterations``, ``variables`` and ``get_weights()`` read the server's
copy, and ``set_weights()`` writes it.

Backends: with JAX, ``model.fit`` compiles the train step, which calls
``stateless_apply``; the round trip runs there as an ordered
``jax.experimental.io_callback``. With TensorFlow the trainer traces the step
with ``tf.function``, and the round trip runs there as one ``tf.py_function``
(``client/keras_tensorflow.py``). With PyTorch the trainer calls ``apply``
eagerly. See docs/keras.md for what is supported.

This module imports Keras; ``optserve.client`` loads it only when
``RemoteOptimizer`` is first asked for.
"""

from __future__ import annotations

import json
import logging
import time

import keras
import numpy as np
from keras import ops

# A Keras internal used on purpose, present since Keras 3.0: the model's variables
# must not be tracked as optimizer variables (Keras's own build() runs under it).
from keras.src.utils import tracking

from optserve.client import keras_classes, security
from optserve.client.client import (
    Client,
    NotFoundError,
    StepMismatchError,
    UnavailableError,
    parse_address,
)
from optserve.client.keras_features import KerasFeatures, is_schedule, plain_rate_function, refuse_valueless, row_sparse
from optserve.client.keras_state import ServerState
from optserve.client.keras_support import (
    cast_gradient,
    change_token,
    deserialize_optimizer,
    eager_scope,
    host_code,
    host_gradient,
    in_tf_graph,
    initial_learning_rate,
    is_jax_sparse,
    job_id,
    overwrite,
    portable_config,
    refuse_overwrite_with_gradient,
    refuse_traced,
    tensorflow_helpers,
    to_numpy,
    variable_names,
)
from optserve.client.remote_job import (
    PulledValues,
    check_job_arguments,
    check_resume,
    check_server_layout,
    job_config,
    match_variables,
)
from optserve.client.steps import StepTracker
from optserve.protos.tensors import SparseGradient

__all__ = ["RemoteOptimizer"]

log = logging.getLogger("optserve.client.keras")

# How long a step waits for a server that is down (a container restart takes
# seconds to minutes) before the error reaches the training loop.
DEFAULT_RETRY_WINDOW_S = 300.0
_MAX_RETRY_PAUSE_S = 5.0

# `variables` is Keras 3's layout, [iterations, learning_rate (a float's), *slots]: the counter comes first.
_ITERATIONS_POSITION = 0

# Keyword arguments of the Keras base optimizer that the worker needs to know as
# well as the server: `loss_scale_factor` scales the loss before the gradients
# are computed; the others are reported as attributes, like Keras does.
_BASE_ARGUMENTS = (
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
)


@keras.saving.register_keras_serializable(package="optserve")
class RemoteOptimizer(KerasFeatures, ServerState, keras.optimizers.Optimizer):
    """A Keras optimizer that trains through an optserve parameter server.

    Args:
        optimizer: the optimizer the server runs: a Keras optimizer instance,
            its `keras.optimizers.serialize()` dict, or a name such as `"adam"`.
            Learning-rate schedules are supported.
        address: the server, `"host:port"`.
        model_id: names the training job on the server. Workers that use the
            same `model_id`, optimizer, variables and `num_workers` share one
            model; the first creates it, the others join it and adopt its values.
            None (the default, one worker only): a new job of its own, named
            after the optimizer plus a random suffix, so a rerun never
            continues an earlier run by accident.
        resume: what to do when the server already holds `model_id`:
            `"auto"` (the default) joins it, logging what was joined; `False`
            refuses a job that has already trained (iterations > 0); `True`
            requires the job to exist. An optimizer rebuilt from its config
            (`load_model`) always resumes.
        num_workers: workers whose gradients the server sums for each
            synchronous step (an all-reduce "sum": scale each worker's loss so
            that the sum is the gradient you want).
        worker_index: this worker, in `[0, num_workers)`.
        mode: `"sync"` (one update per step from all workers' gradients) or
            `"async"` (every push is applied as it arrives).
        sync_timeout_s: how long the server waits for the workers of a
            synchronous step; 0 uses the server's default.
        timeout: seconds a call to the server may take (retries included),
            except a push, which waits as long as its synchronous step does.
        retry_window_s: how long a training step waits for a server that is
            down or restarting before it fails (default 5 minutes).
        tls: TLS settings as `optserve.client.Client` takes them (a CA bundle
            path, a dict with `ca`, `cert`, `key`, `server_name`, ...); None
            reads `OPTSERVE_TLS_*`. `get_config()` keeps file paths, never PEM bytes.
        token: the bearer token; None reads `OPTSERVE_TOKEN`. Never part of
            `get_config()`, so `model.save` does not store it: a loaded model
            takes it from the environment.
        **kwargs: `name` names this optimizer; any other argument (for example
            `learning_rate=0.01` or `clipnorm=1.0`) overrides the wrapped
            optimizer's configuration.

    The variables are identified on the server by `variable.path`; a worker
    whose paths differ but whose variables have the same shapes and dtypes in
    the same order (an auto-named rerun of the same model) joins by position.
    """

    def __new__(cls, *args, **kwargs):
        # One subclass per wrapped Keras class (client/keras_classes.py): isinstance(opt, keras.optimizers.Adam).
        return super().__new__(keras_classes.remote_class(cls, *args, **kwargs))

    def __init__(
        self,
        optimizer,
        address,
        *,
        model_id=None,
        num_workers=1,
        worker_index=0,
        mode="sync",
        sync_timeout_s=0.0,
        timeout=60.0,
        resume="auto",
        retry_window_s=DEFAULT_RETRY_WINDOW_S,
        tls=None,
        token=None,
        **kwargs,
    ):
        name = kwargs.pop("name", None)
        address = parse_address(address)
        tls = tls if tls is None or isinstance(tls, bool) else security.resolve_tls(tls)
        token = None if token is None else security.resolve_token(token)
        wrapped, rate_function = _wrapped_optimizer(optimizer, kwargs)
        check_job_arguments(
            "unnamed" if model_id is None else model_id, num_workers, worker_index, mode, sync_timeout_s, timeout
        )
        model_id = job_id(model_id, num_workers, name or wrapped.name)
        check_resume(resume)
        if not isinstance(retry_window_s, (int, float)) or isinstance(retry_window_s, bool) or retry_window_s < 0:
            raise ValueError(f"`retry_window_s` must be a number >= 0. Received: retry_window_s={retry_window_s!r}")
        wrapped_config = portable_config(wrapped)
        first_learning_rate = initial_learning_rate(wrapped)

        # The base optimizer's __init__, not the wrapped Keras class's (client/keras_classes.py).
        keras.optimizers.Optimizer.__init__(
            self,
            # A callable keeps Keras from creating its learning-rate variable: the
            # rate lives on the server, and a mirror of it takes that variable's place.
            learning_rate=self._server_learning_rate,
            name=name or wrapped.name,
            **{key: getattr(wrapped, key) for key in _BASE_ARGUMENTS},
        )
        self.address = address
        self.model_id = model_id
        self.num_workers = int(num_workers)
        self.worker_index = int(worker_index)
        self.mode = mode
        self.sync_timeout_s = float(sync_timeout_s)
        self.timeout = None if timeout is None else float(timeout)
        self.resume = resume
        self.retry_window_s = float(retry_window_s)
        self._tls, self._token = tls, token
        # JSON text, not a dict: an attribute dict would be wrapped by Keras's tracker.
        self._wrapped_config_json = json.dumps(wrapped_config)
        self._client = None
        self._learning_rate_value = first_learning_rate
        # A plain callable rate: called before each step, as Keras calls it, and sent when it changes.
        self._rate_function = rate_function
        self._weight_decay_exclusions = None  # server-name patterns, resolved at build
        self._steps = StepTracker()  # shared with self.client: the one record of the server's counters
        self._slots_stale = False
        self._refreshing = False
        self._variable_names = []
        self._slot_mirrors = []
        self._pulled = PulledValues()
        self._warned_learning_rate_writer = False
        self._replace_iterations_variable(float_rate=not is_schedule(wrapped) and rate_function is None)

    # ------------------------------------------------------------------ configuration

    @property
    def wrapped_config(self):
        """The wrapped optimizer, as `keras.optimizers.serialize()` gives it."""
        return json.loads(self._wrapped_config_json)

    def get_config(self):
        config = {**job_config(self), "retry_window_s": self.retry_window_s}
        if self._weight_decay_exclusions:
            config["weight_decay_exclusions"] = list(self._weight_decay_exclusions)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # `resume` is not in the config: an optimizer rebuilt from it (load_model)
        # continues its job, joining it if the server still holds it. The weight-decay
        # exclusions, resolved when it was built, come back with it (the job holds them).
        config = dict(config)
        exclusions = config.pop("weight_decay_exclusions", None)
        optimizer = cls(**config)
        optimizer._weight_decay_exclusions = list(exclusions) if exclusions else None
        return optimizer

    def _server_optimizer_config(self):
        # Keras names optimizer instances "adam", "adam_1", ... in creation order;
        # the server compares configs to let workers join, so the name stays out.
        config = self.wrapped_config
        config["config"].pop("name", None)
        if self._weight_decay_exclusions:
            # Patterns that each match one variable's server name exactly; part of the
            # config, so a worker excluding other variables is refused when it joins.
            config["config"]["weight_decay_exclusions"] = list(self._weight_decay_exclusions)
        return config

    # ------------------------------------------------------------------ connection

    @property
    def client(self):
        """The `optserve.client.Client` this optimizer talks through (created on first use)."""
        if self._client is None:
            self._client = Client(
                self.address, timeout=self.timeout, tls=self._tls, token=self._token, step_tracker=self._steps
            )
        return self._client

    def close(self):
        """Close the connection to the server; the server keeps the model."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # ------------------------------------------------------------------ build

    @tracking.no_automatic_dependency_tracking
    @host_code
    def build(self, variables):
        """Create the model on the server from `variables`' current values, or join it.

        When the model already exists (another worker created it, or this job
        is resuming), the server's variable values are adopted.
        """
        if self.built:
            return
        variables = list(variables)
        if not variables:
            # Keras's build([]): nothing to train, so no job on the server; the optimizer is built.
            self.built = True
            return
        with eager_scope():
            self._build_on_server(variables)

    def _build_on_server(self, variables):
        local_names = variable_names(variables)
        local_values = {name: to_numpy(v) for name, v in zip(local_names, variables)}
        refuse_valueless(variables, local_names, local_values)
        existing = self._existing_job()
        names = local_names
        if existing is not None:
            names = match_variables(self.model_id, existing, local_names, local_values)
            if self.resume is False and existing.iterations > 0:
                raise ValueError(
                    f"Model {self.model_id!r} on {self.address} has already trained {existing.iterations} "
                    "iterations, and resume=False. Pass resume='auto' to continue it, delete it "
                    f"(`optserve delete {self.address} {self.model_id}`), or use another `model_id`."
                )
        elif self.resume is True:
            raise ValueError(
                f"resume=True, but the server at {self.address} holds no model {self.model_id!r}. "
                "Pass resume='auto' to create it."
            )
        initial_values = {name: local_values[local] for name, local in zip(names, local_names)}
        if self._weight_decay_exclusions is None or any(
            getattr(self, key, None) for key in ("_exclude_from_weight_decay", "_exclude_from_weight_decay_pattern")
        ):
            self._weight_decay_exclusions = self._excluded_names(variables, names)
        info = self.client.create_model(
            self.model_id,
            self._server_optimizer_config(),
            initial_values,
            num_workers=self.num_workers,
            mode=self.mode,
            sync_timeout_s=self.sync_timeout_s,
            worker_index=self.worker_index,
        )
        check_server_layout(self.model_id, info, names, initial_values)
        # One more round trip, at build only: the slots' shapes and initial values
        # (and, when joining, the variables' values).
        weights = self.client.get_weights(self.model_id, include_variables=not info.created)
        if info.created:
            log.info("Created model %r on %s (%d variables).", self.model_id, self.address, len(names))
        else:
            creator = f", created by {info.activity.describe_creator()}" if info.activity is not None else ""
            log.info(
                "Joined model %r on %s at step %d (iterations %d%s)%s; this worker adopts its variables.",
                self.model_id,
                self.address,
                weights.step,
                weights.iterations,
                creator,
                "" if names == local_names else ", matching variables by position",
            )
            for name, variable in zip(names, variables):
                variable.assign(weights.variables[name])

        self._variable_names = names
        self._trainable_variables = variables[:]
        for index, variable in enumerate(variables):
            self._trainable_variables_indices[self._var_key(variable)] = index
        with keras.name_scope(self.name, caller=self):
            for name in names:
                for slot, value in weights.slots.get(name, {}).items():
                    mirror = self._add_mirror(value, f"{name.replace('/', '_')}_{slot}")
                    self._slot_mirrors.append((name, slot, mirror))
        self._adopt_state(weights.iterations, weights.learning_rate)
        for name, variable in zip(names, variables):
            self._note_pulled(name, variable, weights.variables[name] if not info.created else initial_values[name])
        self._slots_stale = False
        self.built = True

    def _existing_job(self):
        try:
            return self.client.list_models(self.model_id)[0]
        except NotFoundError:
            return None

    # ------------------------------------------------------------------ applying gradients

    def apply_gradients(self, grads_and_vars, name=None, experimental_aggregate_gradients=True):
        """Push `(gradient, variable)` pairs; one round trip. Returns `iterations`.

        `experimental_aggregate_gradients=False` says the gradients are already
        summed across workers: the server applies them once per step as they are.
        """
        grads_and_vars = list(grads_and_vars)
        if not grads_and_vars:
            return self._iterations
        grads, variables = zip(*grads_and_vars)
        self._apply(list(grads), list(variables), aggregated=not experimental_aggregate_gradients)
        return self._iterations

    def apply(self, grads, trainable_variables=None):
        """Push `grads` (one per variable, `None` to skip one); one round trip."""
        self._apply(list(grads), trainable_variables, aggregated=False)

    @host_code
    def _apply(self, grads, trainable_variables, aggregated):
        if len(grads) == 0:
            return
        refuse_traced(grads)
        variables = self._variables_for(grads, trainable_variables)
        grads, variables = self._filter_empty_gradients(grads, variables)
        # Keras's update casts each gradient to its variable's dtype; here it is done before the wire.
        grads = [cast_gradient(g, v.dtype) for g, v in zip(grads, variables)]
        if in_tf_graph():
            refuse_overwrite_with_gradient(variables, "inside a `tf.function`")
            self._graph_apply([(self._name_of(v), g) for g, v in zip(grads, variables)], aggregated)
            return
        grads, variables = self._overwrite_with_gradients(grads, variables)
        names = [self._name_of(v) for v in variables]
        self._write_back(self._changed_variables())
        values = self._push_pull({name: host_gradient(g) for name, g in zip(names, grads)}, aggregated)
        for name, variable in zip(self._variable_names, self._trainable_variables):
            variable.assign(values[name])
            self._note_pulled(name, variable, values[name])
        overwrite(self._iterations, np.asarray(self._server_iterations, dtype=self._iterations.dtype))
        self._apply_constraints()

    def _graph_apply(self, named_grads, aggregated):
        """Inside a `tf.function`: the round trip as one host call, then in-graph assignments."""
        dtypes = [v.dtype for v in self._trainable_variables] + [self._iterations.dtype]

        def host_step(host_grads, current_values):
            self._write_back(self._changed_values(current_values))
            values = self._push_pull(host_grads, aggregated)
            self._note_all_pulled(values)
            return [values[name] for name in self._variable_names] + [
                np.asarray(self._server_iterations, dtype=self._iterations.dtype)
            ]

        current = [v.value for v in self._trainable_variables]
        outputs = tensorflow_helpers().graph_round_trip(named_grads, host_step, dtypes, current)
        for variable, value in zip(self._trainable_variables, outputs[:-1]):
            variable.assign(ops.reshape(value, variable.shape))
        self._iterations.assign(ops.reshape(outputs[-1], ()))
        self._graph_apply_constraints()

    def _graph_apply_constraints(self):
        constrained = [(n, v) for n, v in zip(self._variable_names, self._trainable_variables) if v.constraint]
        if not constrained:
            return
        for _, variable in constrained:
            variable.assign(variable.constraint(variable.value))
        names = [name for name, _ in constrained]

        def write_back(values, _):
            self._write_back({n: np.asarray(values[n]) for n in names})
            return []

        tensorflow_helpers().graph_round_trip([(n, v.value) for n, v in constrained], write_back, [])

    def _variables_for(self, grads, trainable_variables):
        # The same checks, in the same words, as Keras's BaseOptimizer.apply.
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must already be built "
                    "on a list of variables. Call `optimizer.build(trainable_variables)` first."
                )
            if len(grads) != len(self._trainable_variables):
                raise ValueError(
                    "When passing `grads` as a list of gradient tensors, the gradients must match "
                    f"the variables one-to-one. Received a list of {len(grads)} gradients, but the "
                    f"optimizer is tracking {len(self._trainable_variables)} trainable variables."
                )
            return list(self._trainable_variables)
        variables = list(trainable_variables)
        if len(grads) != len(variables):
            raise ValueError(
                f"Received {len(grads)} gradients for {len(variables)} variables; they must match one-to-one."
            )
        if not self.built:
            self.build(variables)
        self._check_variables_are_known(variables)
        return variables

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        """What the JAX trainer calls (inside `jax.jit` by default): one round trip.

        Returns the server's new variable values and `optimizer_variables` with
        the new iteration count. The slot entries are passed through unchanged:
        the slots live on the server, and the optimizer variables re-read it.
        """
        if not self.built:
            raise ValueError(
                "To call `stateless_apply`, RemoteOptimizer must be built. "
                "You can build it via `optimizer.build(trainable_variables)`."
            )
        if len(trainable_variables) != len(self._trainable_variables):
            raise ValueError(
                "Argument `trainable_variables` must match the variables the optimizer was built with "
                f"one-to-one. Received {len(trainable_variables)} values, expected "
                f"{len(self._trainable_variables)}."
            )
        if len(optimizer_variables) != len(self.variables):
            raise ValueError(
                f"Argument `optimizer_variables` must match `optimizer.variables` one-to-one. Received "
                f"{len(optimizer_variables)} values, expected {len(self.variables)}."
            )
        if self.gradient_accumulation_steps:
            refuse_overwrite_with_gradient(self._trainable_variables, "with `gradient_accumulation_steps`")
        grads = [cast_gradient(g, v.dtype) for g, v in zip(grads, self._trainable_variables)]
        if keras.backend.backend() == "jax":
            new_values, new_iterations = self._jax_stateless_step(grads, trainable_variables)
        else:
            new_values, new_iterations = self._eager_stateless_step(grads, trainable_variables)
        # A caller may pass the variables themselves (LossScaleOptimizer does, in a StatelessScope):
        # what comes back must be values.
        optimizer_variables = [v.value if isinstance(v, keras.Variable) else v for v in optimizer_variables]
        optimizer_variables[_ITERATIONS_POSITION] = new_iterations
        return new_values, optimizer_variables

    def _jax_stateless_step(self, grads, trainable_variables):
        import jax
        from jax.experimental import io_callback

        value_types = [jax.ShapeDtypeStruct(np.shape(v), v.dtype) for v in trainable_variables]
        iterations_type = jax.ShapeDtypeStruct((), self._iterations.dtype)

        # A BCOO gradient of whole rows (an Embedding's) crosses as its rows and
        # row indices and goes on the wire sparse; any other BCOO is densified.
        grads = [g.todense() if is_jax_sparse(g) and not row_sparse(g) else g for g in grads]
        sparse = [is_jax_sparse(g) for g in grads]
        flat = []
        for g, is_sparse in zip(grads, sparse):
            flat += [g.data, g.indices[:, 0]] if is_sparse else [g]
        count = len(flat)

        def host_step(*arrays):
            # Runs on the host with NumPy arrays, once per step, in program order:
            # the gradients, then the values the trainer carries (changed if the
            # user wrote the model's variables since the last step).
            host_flat, current_values = iter(arrays[:count]), arrays[count:]
            host_grads = {}
            for name, is_sparse in zip(self._variable_names, sparse):
                if is_sparse:
                    data = np.asarray(next(host_flat))
                    host_grads[name] = SparseGradient(np.asarray(next(host_flat)), data)
                else:
                    host_grads[name] = next(host_flat)
            self._write_back({**self._changed_values(current_values), **self._take_overwrites(host_grads)})
            values = self._push_pull(host_grads, aggregated=False)
            new_values = [np.asarray(values[name], dtype=t.dtype) for name, t in zip(self._variable_names, value_types)]
            self._note_all_pulled(dict(zip(self._variable_names, new_values)))
            return new_values, np.asarray(self._server_iterations, dtype=iterations_type.dtype)

        new_values, new_iterations = io_callback(
            host_step, (value_types, iterations_type), *flat, *trainable_variables, ordered=True
        )
        new_values = self._stateless_constraints(list(new_values), io_callback)
        return new_values, new_iterations

    def _eager_stateless_step(self, grads, trainable_variables):
        host_grads = {name: to_numpy(g) for name, g in zip(self._variable_names, grads)}
        changed = self._changed_values([to_numpy(v) for v in trainable_variables])
        self._write_back({**changed, **self._take_overwrites(host_grads)})
        values = self._push_pull(host_grads, aggregated=False)
        self._note_all_pulled(values)
        new_values = [
            ops.convert_to_tensor(values[name], dtype=v.dtype)
            for name, v in zip(self._variable_names, self._trainable_variables)
        ]
        new_values = self._stateless_constraints(new_values, None)
        return new_values, ops.convert_to_tensor(self._server_iterations, dtype=self._iterations.dtype)

    def _push_pull(self, grads, aggregated):
        """The one round trip of a step: push gradients, receive every variable's new value.

        A server that is down is waited for (up to `retry_window_s`); one that
        came back at another step (it restored an older checkpoint) is
        followed: this worker adopts its step and pushes the gradients there.
        """
        self._send_rate_function_value()
        waiting_since = None
        while True:
            try:
                result, values = self.client.push_pull(
                    self.model_id, grads, worker_index=self.worker_index, aggregated=aggregated
                )
                break
            except StepMismatchError as error:
                self._adopt_server_step(error)
            except UnavailableError as error:
                waiting_since = self._wait_for_server(error, waiting_since)
        if waiting_since is not None:
            log.warning(
                "Model %r: the server at %s is back after %.0f s.",
                self.model_id,
                self.address,
                time.monotonic() - waiting_since,
            )
        missing = [name for name in self._variable_names if name not in values]
        if missing:
            raise RuntimeError(f"The server's answer for model {self.model_id!r} lacks the variables {missing}.")
        self._adopt_state(result.iterations, result.learning_rate)
        self._adopt_step_result(result)
        self._slots_stale = True
        return values

    def _adopt_step_result(self, result):
        """Hook: a step's answer (client/keras_loss_scale.py reads the loss scale from it)."""

    def _send_rate_function_value(self):
        if self._rate_function is None or self.worker_index != 0:
            return
        value = float(to_numpy(self._rate_function()))
        if value != self._learning_rate_value:
            state = self.client.set_weights(self.model_id, learning_rate=value)
            self._adopt_state(state.iterations, state.learning_rate)

    def _adopt_server_step(self, error):
        behind = error.step - error.current_step
        if behind > 0:
            log.warning(
                "Model %r: the server is at step %d, behind this worker's step %d: it restored an "
                "older checkpoint, and %d step(s) are lost. Going on from the server's step and variables.",
                self.model_id,
                error.current_step,
                error.step,
                behind,
            )
        else:
            log.warning(
                "Model %r: the server is at step %d, ahead of this worker's step %d; adopting it.",
                self.model_id,
                error.current_step,
                error.step,
            )
        self.client.resync(self.model_id, self.worker_index)

    def _wait_for_server(self, error, waiting_since):
        now = time.monotonic()
        if waiting_since is None:
            waiting_since = now
            log.warning(
                "Model %r: the server at %s is unavailable (%s); retrying for up to %.0f s.",
                self.model_id,
                self.address,
                error,
                self.retry_window_s,
            )
        if now - waiting_since >= self.retry_window_s:
            raise error
        time.sleep(min(_MAX_RETRY_PAUSE_S, max(0.0, self.retry_window_s - (now - waiting_since))))
        return waiting_since

    # ------------------------------------------------------------------ writes outside the optimizer

    def _note_pulled(self, name, variable, value):
        """`variable` now holds `value`, the server's."""
        self._pulled.note(name, value, change_token(variable))

    def _note_all_pulled(self, values):
        # Stateless steps: the trainer holds the values, so no token (compare by value).
        for name in self._variable_names:
            self._pulled.note(name, values[name])

    def _changed_variables(self):
        """Eagerly: the model variables written since they last agreed with the server."""
        candidates = [
            (name, variable)
            for name, variable in zip(self._variable_names, self._trainable_variables)
            if self._pulled.token(name) is None or change_token(variable) != self._pulled.token(name)
        ]
        return self._pulled.changed([n for n, _ in candidates], [to_numpy(v) for _, v in candidates])

    def _changed_values(self, current_values):
        return self._pulled.changed(self._variable_names, current_values)

    def _write_back(self, changed):
        """Send variables written outside the optimizer (set_weights, load_weights, ...) to the server."""
        if not changed:
            return
        log.info(
            "Model %r: %d variable(s) changed outside the optimizer; writing them to the server.",
            self.model_id,
            len(changed),
        )
        self.client.set_weights(self.model_id, variables=changed)
        self._pulled.keep(changed)
        self._slots_stale = True

    # ------------------------------------------------------------------ constraints

    def _apply_constraints(self):
        """Keras applies `variable.constraint` after each update; the server must keep the result too."""
        constrained = {}
        for name, variable in zip(self._variable_names, self._trainable_variables):
            if variable.constraint is not None:
                variable.assign(variable.constraint(variable))
                constrained[name] = to_numpy(variable).copy()
        if constrained:
            self.client.set_weights(self.model_id, variables=constrained)
            for name, variable in zip(self._variable_names, self._trainable_variables):
                if name in constrained:
                    self._note_pulled(name, variable, constrained[name])

    def _stateless_constraints(self, new_values, io_callback):
        constrained = {}
        for index, (name, variable) in enumerate(zip(self._variable_names, self._trainable_variables)):
            if variable.constraint is not None:
                new_values[index] = variable.constraint(new_values[index])
                constrained[name] = new_values[index]
        if not constrained:
            return new_values
        names = list(constrained)

        def write_back(*arrays):
            values = {name: np.array(array) for name, array in zip(names, arrays)}
            self.client.set_weights(self.model_id, variables=values)
            for name, value in values.items():
                self._pulled.note(name, value)

        if io_callback is None:
            write_back(*[to_numpy(constrained[name]) for name in names])
        else:
            io_callback(write_back, None, *[constrained[name] for name in names], ordered=True)
        return new_values

    def finalize_variable_values(self, var_list):
        """With `use_ema`, the model variables take their moving averages, here and on the server."""
        if not self.use_ema or not self.built:
            return
        slots = self.client.get_weights(self.model_id).slots
        averages = {name: slots[name]["average"] for name in self._variable_names if "average" in slots.get(name, {})}
        known = {self._var_key(v): n for n, v in zip(self._variable_names, self._trainable_variables)}
        for variable in var_list:
            name = known.get(self._var_key(variable))
            if name in averages:
                variable.assign(averages[name])
        if averages:
            self.client.set_weights(self.model_id, variables=averages)
            self._slots_stale = True

    def _name_of(self, variable):
        return self._variable_names[self._get_variable_index(variable)]


# --------------------------------------------------------------------------- helpers


def _wrapped_optimizer(optimizer, overrides):
    """A Keras optimizer instance from any accepted form, with `overrides` applied (validates eagerly)."""
    if isinstance(optimizer, RemoteOptimizer):
        raise ValueError("`optimizer` must be a plain Keras optimizer, not another RemoteOptimizer.")
    if isinstance(optimizer, str):
        instance = keras.optimizers.get(optimizer)
    elif isinstance(optimizer, dict):
        config = dict(optimizer)
        if "class_name" not in config:
            raise ValueError(
                "`optimizer` given as a dict must be a `keras.optimizers.serialize()` result "
                f"(with 'class_name'). Received keys: {sorted(config)}"
            )
        if "config" not in config:  # a bare get_config() dict with its class name beside it
            config = {"class_name": config.pop("class_name"), "config": config}
        instance = deserialize_optimizer(config)
    elif isinstance(optimizer, keras.optimizers.Optimizer):
        instance = optimizer
    else:
        raise TypeError(
            "`optimizer` must be a Keras optimizer, its serialized config or a name such as 'adam'. "
            f"Received: optimizer={optimizer!r}"
        )
    rate_function = plain_rate_function(instance._learning_rate)
    if overrides or rate_function is not None:
        config = instance.get_config()
        if rate_function is not None:
            # The server gets the rate's current value; the function stays on the worker.
            config["learning_rate"] = float(to_numpy(rate_function()))
        config.update(overrides)
        rate_function = plain_rate_function(config.get("learning_rate")) or rate_function
        if rate_function is not None and callable(config.get("learning_rate")):
            config["learning_rate"] = float(to_numpy(rate_function()))
        instance = instance.__class__.from_config(config)
    return instance, rate_function
