"""Keras 3.15's optimizer apply pipeline over named variables held by a backend.

One ``apply(grads)`` call does what ``keras.optimizers.Optimizer.apply`` does:
drop missing gradients, divide by ``loss_scale_factor``, accumulate over
``gradient_accumulation_steps``, clip (``clipnorm`` / ``global_clipnorm`` /
``clipvalue``), decoupled ``weight_decay``, the optimizer's own update, the EMA
of the variables, and the iteration counter. Every elementwise stage is an
``UpdateKernel``; scalars that depend on the step or the learning rate are
computed here on the host, in the variable's dtype, the way Keras computes them
with 0-d tensors, so that the kernels see the very same numbers Keras uses.

Gradients are never written: a stage that must change a gradient writes it
into a buffer the optimizer owns (the gradient accumulator under gradient
accumulation, else a per-variable scratch buffer allocated once at build).

State layout, per variable, in the order Keras 3 creates its variables:
``average`` (``use_ema``), ``gradient_accumulator`` (gradient accumulation),
then the optimizer's own slots (e.g. RMSprop: ``velocity``, ``momentum``,
``average_gradient``). ``get_weights()`` is tf.keras's layout,
``[iterations, *slots variable by variable]``, so EMA averages and gradient
accumulators are part of it; optimizer-wide scalars (Nadam's ``u_product``) are
in ``get_scalars()``, and ``state_dict()`` holds everything, raw counter included.

``Optimizer`` is split by topic: the stages around the update (loss scale,
accumulation, clipping, weight decay, EMA) are in ``gradient_stages.py``, reading
and writing the state (weights, slots, checkpoints) in ``state_access.py``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..bound_state import BoundCall
from ..errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from ..kernels import ADDEND, SUPPORTED_DTYPES, UpdateKernel, copy_name
from ..programs import UpdateProgram
from . import validation as check
from .gradient_stages import ACCUMULATE, ACCUMULATOR_SLOT, EMA_SLOT, GradientStages
from .state_access import StateAccess
from .validation import Hyperparameter, describe_names

# Keras keeps a float learning rate in a float32 variable and evaluates its
# schedules in float32: every rate the updates see is a float32 value.
LEARNING_RATE_DTYPE = np.float32

COMMON_HYPERPARAMETERS: tuple[Hyperparameter, ...] = (
    Hyperparameter("weight_decay", None, check.optional_non_negative),
    Hyperparameter("clipnorm", None, check.optional_positive),
    Hyperparameter("global_clipnorm", None, check.optional_positive),
    Hyperparameter("clipvalue", None, check.optional_positive),
    Hyperparameter("use_ema", False, check.boolean),
    Hyperparameter("ema_momentum", 0.99, check.ema_momentum),
    Hyperparameter("ema_overwrite_frequency", None, check.ema_overwrite_frequency),
    Hyperparameter("loss_scale_factor", None, check.optional_positive),
    Hyperparameter("gradient_accumulation_steps", None, check.accumulation_steps),
)

# A slot's initial value that is a copy of its variable (ScheduleFreeAdamW's momentum).
VARIABLE_VALUE = "variable value"


def _resolve_backend(backend: Any) -> Any:
    """A backend object as is; a device name ("cpu", "gpu", "auto") or None (cpu) looked up."""
    if backend is not None and not isinstance(backend, str):
        return backend
    from ..backends import get_backend

    return get_backend(backend or "cpu")


def snake_case(class_name: str) -> str:
    """Keras's default optimizer name (``keras.src.utils.naming.to_snake_case``)."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _adoptable(array: Any) -> bool:
    return (
        type(array) is np.ndarray
        and array.base is None
        and array.flags.c_contiguous
        and array.flags.writeable
        and array.dtype.isnative
    )


class _Variable:
    """One model variable, its slots (Keras order) and its scratch buffer."""

    __slots__ = ("name", "shape", "dtype", "value", "slots", "scratch", "update", "program_scratch", "bound")

    def __init__(self, name: str, value: Any, shape: tuple, dtype: np.dtype):
        self.name = name
        self.value = value
        self.shape = shape
        self.dtype = dtype
        self.slots: dict[str, Any] = {}
        self.scratch = None
        self.update: UpdateKernel | UpdateProgram | None = None  # this variable's update
        self.program_scratch: dict[str, Any] = {}  # a staged program's arrays, kept across steps
        # Its value and slots checked once as kernel state (backend.bind_state); False: not bindable.
        self.bound: Any = None


class Optimizer(GradientStages, StateAccess):
    """Base class: the Keras apply pipeline; subclasses add slots and one update kernel.

    Subclasses set ``class_name`` (Keras's), ``default_learning_rate`` and
    ``hyperparameters`` (their own constructor arguments in Keras's order), and
    implement ``slot_groups``, ``update_kernel`` and ``update_scalars``.
    ``common_defaults`` overrides the defaults of common arguments (AdamW's
    ``weight_decay``). Optimizers whose slots or update differ from variable to
    variable (Adafactor, Muon) override ``slot_groups_for`` / ``update_kernel_for``.
    """

    class_name = "Optimizer"
    default_learning_rate = 0.001
    hyperparameters: tuple[Hyperparameter, ...] = ()
    common_defaults: Mapping[str, Any] = {}

    def __init__(self, backend: Any = None, **kwargs: Any):
        self._backend = _resolve_backend(backend)
        self._config = self._validated_config(kwargs)
        self.name = self._config["name"]
        self._set_learning_rate_config(self._config.pop("learning_rate"))
        self._variables: dict[str, _Variable] = {}
        self._built = False
        self._raw_iterations = 0
        self._weight_decay_pattern: re.Pattern | None = None
        self._weight_decay_names: list[str] | None = None
        self._weight_decay_cache: dict[str, bool] = {}
        # Set by a LossScaleOptimizer wrapping this one: the dynamic scale that
        # divides the gradients, exactly where `loss_scale_factor` would.
        self.dynamic_loss_scale: float | None = None
        # (dtype, per-variable sums of squares) of a whole sharded model, for one apply.
        self.joint_norm_terms: tuple[Any, list[float]] | None = None

    # ------------------------------------------------------------------ config
    @classmethod
    def argument_names(cls) -> list[str]:
        """Every accepted constructor argument, in Keras's get_config order."""
        common = [h.name for h in COMMON_HYPERPARAMETERS]
        return ["name", "learning_rate", *common, *(h.name for h in cls.hyperparameters)]

    @classmethod
    def _validated_config(cls, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        cls._pop_legacy_decay(kwargs)
        unknown = {k: v for k, v in kwargs.items() if k not in cls.argument_names()}
        if unknown:
            raise InvalidArgumentError(
                f"Argument(s) not recognized: {unknown}. {cls.class_name} accepts: {', '.join(cls.argument_names())}"
            )
        config: dict[str, Any] = {"name": check.name_string("name", kwargs.get("name"))}
        if config["name"] is None:
            config["name"] = snake_case(cls.class_name)
        for hyper in COMMON_HYPERPARAMETERS:
            default = cls.common_defaults.get(hyper.name, hyper.default)
            config[hyper.name] = hyper.check(hyper.name, kwargs.get(hyper.name, default))
        cls._check_single_clipping(config)
        config["learning_rate"] = cls._validated_learning_rate(kwargs.get("learning_rate", cls.default_learning_rate))
        for hyper in cls.hyperparameters:
            config[hyper.name] = hyper.check(hyper.name, kwargs.get(hyper.name, hyper.default))
        cls.check_hyperparameters(config)
        return config

    @staticmethod
    def _pop_legacy_decay(kwargs: dict) -> None:
        # Keras 3 drops `decay` with a warning; an ignored non-zero decay would
        # silently train differently, so only the no-op values pass.
        decay = kwargs.pop("decay", None)
        if decay is not None and decay != 0:
            raise InvalidArgumentError(
                "Argument `decay` is no longer supported (Keras 3 ignores it); use a learning rate "
                f"schedule instead. Received: decay={decay!r}"
            )

    @staticmethod
    def _check_single_clipping(config: Mapping[str, Any]) -> None:
        kinds = ("clipnorm", "clipvalue", "global_clipnorm")
        if sum(config[k] is not None for k in kinds) > 1:
            raise InvalidArgumentError(
                "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
                f"Received: clipnorm={config['clipnorm']}, clipvalue={config['clipvalue']}, "
                f"global_clipnorm={config['global_clipnorm']}"
            )

    @classmethod
    def _validated_learning_rate(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return schedules_deserialize(value)
        if isinstance(value, float):
            value = check.learning_rate_float("learning_rate", value)
            with np.errstate(over="ignore"):
                rounded = float(LEARNING_RATE_DTYPE(value))
            if not math.isfinite(rounded):
                raise InvalidArgumentError(
                    f"`learning_rate` must be finite in float32. Received: learning_rate={value!r}"
                )
            return rounded
        from .. import schedules

        if isinstance(value, schedules.LearningRateSchedule):
            return value
        return check.learning_rate_float("learning_rate", value)

    @classmethod
    def check_hyperparameters(cls, config: Mapping[str, Any]) -> None:
        """Checks that involve several arguments; subclasses extend."""

    def _set_learning_rate_config(self, value: Any) -> None:
        self._schedule = None if isinstance(value, float) else value
        self._learning_rate = value if isinstance(value, float) else None

    def __getattr__(self, name: str) -> Any:
        # Hyperparameters read as attributes, as on a Keras optimizer.
        config = self.__dict__.get("_config")
        if config is not None and name in config:
            return config[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def get_config(self) -> dict[str, Any]:
        """What ``keras.optimizers.serialize`` returns for the same optimizer."""
        from .. import schedules

        learning_rate = self._learning_rate if self._schedule is None else schedules.serialize(self._schedule)
        config: dict[str, Any] = {"name": self.name, "learning_rate": learning_rate}
        for hyper in COMMON_HYPERPARAMETERS:
            config[hyper.name] = self._config[hyper.name]
        for hyper in self.hyperparameters:
            config[hyper.name] = self._config[hyper.name]
        if self._weight_decay_names:
            # Not Keras's (it keeps exclusions out of its config): part of the job, so that a
            # worker excluding other variables is refused when it joins (optimizers.deserialize reads it).
            config["weight_decay_exclusions"] = list(self._weight_decay_names)
        return {"module": "keras.optimizers", "class_name": self.class_name, "config": config, "registered_name": None}

    @property
    def learning_rate(self) -> float:
        return self.current_learning_rate()

    def current_learning_rate(self) -> float:
        """The rate the next update uses (a schedule reads the raw counter, as in Keras)."""
        if self._schedule is not None:
            return float(LEARNING_RATE_DTYPE(self._schedule(self._raw_iterations)))
        assert self._learning_rate is not None  # a float whenever there is no schedule
        return self._learning_rate

    def set_learning_rate(self, value: Any) -> None:
        """Keras's ``optimizer.learning_rate = value``.

        ``value`` is a float, or a schedule (a serialized Keras schedule, checked as in a
        config): a schedule replaces either, a float replaces only a float, as in Keras.
        """
        from .. import schedules

        if isinstance(value, (Mapping, schedules.LearningRateSchedule)):
            self._set_learning_rate_config(self._validated_learning_rate(value))
            return
        if self._schedule is not None:
            # Keras's words (it raises TypeError), and what can be done instead.
            raise FailedPreconditionError(
                "This optimizer was created with a `LearningRateSchedule` object as its `learning_rate` "
                "constructor argument, hence its learning rate is not settable. If you need the learning "
                "rate to be settable, you should instantiate the optimizer with a float `learning_rate` "
                f"argument. (A new schedule can replace it.) Received: learning_rate={value!r}"
            )
        if check.is_real_number(value):
            value = float(value)
        self._learning_rate = self._validated_learning_rate(value)

    @property
    def learning_rate_schedule(self) -> Any:
        """The schedule the learning rate follows, or None for a float learning rate."""
        return self._schedule

    def learning_rate_setting(self) -> Any:
        """The float or schedule as set; ``restore_learning_rate_setting`` puts it back (undo)."""
        return self._schedule if self._schedule is not None else self._learning_rate

    def restore_learning_rate_setting(self, setting: Any) -> None:
        self._set_learning_rate_config(setting)

    # --------------------------------------------------------------- subclass
    def slot_groups(self) -> list[list[tuple[str, float]]]:
        """Slots as Keras creates them: each group is one ``add_optimizer_variables``
        call (its names interleaved per variable), groups in call order;
        each entry is ``(slot name, initial value)``."""
        return []

    def update_kernel(self) -> UpdateKernel | UpdateProgram:
        raise NotImplementedError

    def slot_groups_for(self, name: str, shape: tuple) -> list[list[tuple]]:
        """``slot_groups()`` of one variable; an entry may add a third element, a
        function of the variable's shape giving the slot's shape."""
        return self.slot_groups()

    def update_kernel_for(self, name: str, shape: tuple) -> UpdateKernel | UpdateProgram:
        """The update of one variable (an elementwise kernel or a staged program)."""
        return self.update_kernel()

    def weight_decay_for(self, name: str, shape: tuple) -> float | None:
        """The decoupled weight decay rate of one variable (None: not decayed)."""
        return self._config["weight_decay"]

    def update_scalars(self, dtype: type, lr: np.floating) -> dict[str, float]:
        """Host-side scalars of this step for variables of ``dtype`` (a NumPy scalar type)."""
        raise NotImplementedError

    def before_update_step(self) -> None:
        """Optimizer-wide state updated once per real update (Nadam's u_product)."""

    def optimizer_scalars(self) -> dict[str, tuple[float, np.dtype]]:
        """Optimizer-wide state as ``{name: (value, dtype)}``."""
        return {}

    def assign_optimizer_scalars(self, values: Mapping[str, float]) -> None:
        """Assign already validated optimizer-wide state."""

    def on_build(self) -> None:
        """Called once the variables exist."""

    # ---------------------------------------------------------------- layout
    def _all_slot_groups(self, name: str, shape: tuple) -> list[list[tuple]]:
        groups = []
        if self._config["use_ema"]:
            groups.append([(EMA_SLOT, 0.0)])
        if self._config["gradient_accumulation_steps"]:
            groups.append([(ACCUMULATOR_SLOT, 0.0)])
        return groups + self.slot_groups_for(name, shape)

    def _slot_names(self, name: str) -> list[str]:
        return [entry[0] for group in self._all_slot_groups(name, self._variables[name].shape) for entry in group]

    def _weights_layout(self) -> list[tuple[str, str]]:
        """(variable, slot) pairs of ``get_weights()``: variable by variable, slots in Keras order."""
        return [(name, slot) for name, variable in self._variables.items() for slot in variable.slots]

    @property
    def built(self) -> bool:
        return self._built

    @property
    def variable_names(self) -> list[str]:
        return list(self._variables)

    @property
    def raw_iterations(self) -> int:
        return self._raw_iterations

    @property
    def iterations(self) -> int:
        steps = self._config["gradient_accumulation_steps"]
        return self._raw_iterations // steps if steps else self._raw_iterations

    def slot_names(self, name: str) -> list[str]:
        """Slot names of one variable, in Keras order (EMA average and gradient
        accumulator first when configured, as Keras creates them first)."""
        return list(self._require_variable(name).slots)

    # ----------------------------------------------------------------- build
    def arrays_per_variable(self, name: str, shape: tuple) -> int:
        """Arrays of a variable's size this optimizer keeps for variable ``name`` of ``shape``: the
        variable itself, its slots and its scratch buffer. Known from the config alone, before
        ``build`` (memory budgets); a slot smaller than its variable (Adafactor's factored ``r``
        and ``c``) counts as a whole one, so the estimate errs high."""
        slots = sum(len(group) for group in self._all_slot_groups(name, tuple(shape)))
        return 1 + slots + int(self._needs_scratch())

    def build(self, variables: Mapping[str, Any], adopt: bool = False) -> None:
        """Copy the variables (order kept) into owned storage and create the slots.

        ``adopt``: the caller hands over arrays nobody else will use (a request's decoded
        tensors); on the host backend those already owned, C-contiguous and native are kept
        as they are instead of copied, so building a model does not need twice its memory.
        """
        if self._built:
            raise FailedPreconditionError(
                f"Optimizer '{self.name}' is already built on {len(self._variables)} variables."
            )
        if not isinstance(variables, Mapping) or not variables:
            raise InvalidArgumentError("`build` needs a non-empty {name: array} mapping of variables.")
        hosts = {}
        for name, value in variables.items():
            if not isinstance(name, str) or not name:
                raise InvalidArgumentError(f"Variable names must be non-empty strings. Received: {name!r}")
            host = np.asarray(value)
            if host.dtype not in SUPPORTED_DTYPES:
                raise InvalidArgumentError(
                    f"Variable '{name}' has dtype {host.dtype}; supported dtypes are float32 and float64."
                )
            hosts[name] = host
        for name, host in hosts.items():
            self._variables[name] = self._new_variable(name, host, adopt)
        self._built = True
        self.on_build()

    def _new_variable(self, name: str, host: np.ndarray, adopt: bool = False) -> _Variable:
        backend = self._backend
        if adopt and getattr(backend, "name", "") == "cpu" and _adoptable(host):
            value = host
        else:
            value = backend.asarray(host, host.dtype)  # an owned, C-contiguous copy
        variable = _Variable(name, value, tuple(host.shape), host.dtype)
        for group in self._all_slot_groups(name, variable.shape):
            for slot, initial, *shaped in group:
                shape = tuple(shaped[0](variable.shape)) if shaped else variable.shape
                if isinstance(initial, str) and initial == VARIABLE_VALUE:
                    variable.slots[slot] = backend.asarray(host, host.dtype)
                else:
                    variable.slots[slot] = backend.full(shape, initial, variable.dtype)
        if self._needs_scratch():
            variable.scratch = backend.full(variable.shape, 0, variable.dtype)
        variable.update = self.update_kernel_for(name, variable.shape)
        if isinstance(variable.update, UpdateProgram):
            variable.program_scratch = {
                scratch: backend.full(shape, 0, variable.dtype)
                for scratch, shape in variable.update.scratch_shapes(variable.shape).items()
            }
        return variable

    def _needs_scratch(self) -> bool:
        # Under gradient accumulation the accumulator holds the gradient to change.
        if self._config["gradient_accumulation_steps"]:
            return False
        clipping = any(self._config[k] is not None for k in ("clipnorm", "global_clipnorm", "clipvalue"))
        return clipping or self._config["loss_scale_factor"] is not None or self.dynamic_loss_scale is not None

    def _require_built(self) -> None:
        if not self._built:
            raise FailedPreconditionError(f"Optimizer '{self.name}' has no variables yet; call build(variables) first.")

    def _require_variable(self, name: str) -> _Variable:
        self._require_built()
        variable = self._variables.get(name)
        if variable is None:
            raise NotFoundError(
                f"Unknown variable {name!r}. This optimizer holds: {describe_names(list(self._variables))}"
            )
        return variable

    def _require_variables(self, names: Iterable[str]) -> list[_Variable]:
        return [self._require_variable(name) for name in names]

    # ------------------------------------------------------------ weight decay
    def exclude_from_weight_decay(self, var_names: Sequence[str] | None = None) -> None:
        """Keras's ``exclude_from_weight_decay(var_names=...)``: a variable whose
        name contains a match of any of these regular expressions is not decayed."""
        names = list(var_names or [])
        if not all(isinstance(n, str) and n for n in names):
            raise InvalidArgumentError(
                f"`var_names` must be a list of non-empty strings. Received: var_names={names!r}"
            )
        try:
            pattern = re.compile("|".join(sorted(set(names)))) if names else None
        except re.error as error:
            raise InvalidArgumentError(f"`var_names` is not a valid regular expression list: {error}") from None
        self._weight_decay_names = names or None
        self._weight_decay_pattern = pattern
        self._weight_decay_cache = {}

    def _uses_weight_decay(self, name: str) -> bool:
        cached = self._weight_decay_cache.get(name)
        if cached is None:
            pattern = self._weight_decay_pattern
            cached = pattern is None or pattern.search(name) is None
            self._weight_decay_cache[name] = cached
        return cached

    # ----------------------------------------------------------------- apply
    def apply(
        self,
        grads: Mapping[str, Any],
        *,
        count_empty_step: bool = False,
        reply_into: Sequence[Any] | None = None,
        addends: Mapping[str, Any] | None = None,
    ) -> list[dict[str, np.ndarray]] | None:
        """One Keras ``optimizer.apply``: checked as a whole first, then applied.

        Like Keras, a call without any gradient is an error, unless ``count_empty_step``:
        then it is a step that changes no variable through a gradient, and everything
        else a step does happens as in a Keras apply whose gradients all belong to
        other variables: the counters (and so the schedule) advance, optimizer-wide
        state such as Nadam's ``u_product`` is updated on an update step, gradient
        accumulators are reset at the end of an accumulation cycle, and the EMA of the
        variables is taken. A sharded model's server gets such a step when none of its
        variables got a gradient, so that every shard's state stays in step.

        ``reply_into``: allocators as ``read_variables_into_each`` takes; the variables after the
        step are written into each one's arrays, where the backend can by the update kernel itself
        (the values are in registers then), and the filled ``{name: array}`` are returned.

        ``addends``: more gradients ``{name: array}`` added to ``grads`` (a sync step's last push,
        summed into the others'): by the update kernel itself where it can, which saves a pass over
        memory, else first (``sum_into``); the bits are the same either way.
        """
        self._require_built()
        grads, left = self._kernel_addends(grads, addends)
        gradients = self._validated_gradients(grads, allow_empty=count_empty_step)
        kernel_addends = {variable: self._device_array(addend) for variable, addend in left} if left else None
        lr = self._learning_rate_for_step()
        variables = list(self._variables.values())
        replies = None if reply_into is None else self._allocated(variables, reply_into)
        # With an EMA, a step may still overwrite the variables after their update.
        fused_replies = None if self._config["use_ema"] else replies
        written: set[str] = set()
        steps = self._config["gradient_accumulation_steps"]
        if steps and (self._raw_iterations + 1) % steps != 0:
            self._accumulate(gradients)
        elif steps:
            self._update(self._accumulated_means(gradients, steps), lr, fused_replies, written)
            self._reset_accumulators()
        else:
            self._update(self._unscaled(gradients), lr, fused_replies, written, kernel_addends)
        if self._config["use_ema"]:
            self._update_moving_averages()
        self._raw_iterations += 1
        if replies is None:
            return None
        unwritten = [variable for variable in variables if variable.name not in written]
        if unwritten:
            self._copy_out(unwritten, replies)
        return replies

    def sum_into(self, grads: Mapping[str, Any], addends: Mapping[str, Any] | None) -> Mapping[str, Any]:
        """``grads`` with ``addends`` added now, into the arrays of ``grads`` where they are writable
        host arrays (else into copies); an addend of a variable without a gradient is its gradient."""
        if not addends:
            return grads
        grads, addends = self._split_addends(grads, addends)
        self._checked_gradients(grads)
        return self._added(grads, self._checked_gradients(addends))

    def _added(self, grads: dict, addends: list[tuple[_Variable, Any]]) -> dict:
        """``grads`` (checked) with the checked ``addends``, each of a variable with a gradient, added."""
        pairs = []
        for variable, addend in addends:
            total = grads[variable.name]
            if not (isinstance(total, np.ndarray) and total.flags.writeable and total.flags.c_contiguous):
                total = grads[variable.name] = np.array(total, dtype=variable.dtype)
            pairs.append((total, np.asarray(addend)))
        self.add_host_arrays(pairs)
        return grads

    def _split_addends(self, grads: Mapping[str, Any], addends: Mapping[str, Any]) -> tuple[dict, dict]:
        """(``grads`` and the addends of variables without a gradient, the other addends)."""
        if not isinstance(grads, Mapping) or not isinstance(addends, Mapping):
            raise InvalidArgumentError("Gradients and addends must be {name: array} mappings.")
        grads, left = dict(grads), {}
        for name, addend in addends.items():
            if grads.get(name) is None:
                grads[name] = addend
            else:
                left[name] = addend
        return grads, left

    def _kernel_addends(
        self, grads: Mapping[str, Any], addends: Mapping[str, Any] | None
    ) -> tuple[Mapping, list[tuple[_Variable, Any]]]:
        """(the gradients, the checked addends the update kernels add): those added first are of
        variables updated by a staged program, or of a step whose gradients are transformed before
        the update (clipped, unscaled, accumulated), or of a backend off the host."""
        if not addends:
            return grads, []
        config = self._config
        in_kernels = (
            self._on_host
            and not config["gradient_accumulation_steps"]
            and self._loss_scale() is None
            and all(config[name] is None for name in ("clipnorm", "global_clipnorm", "clipvalue"))
        )
        grads, addends = self._split_addends(grads, addends)
        self._checked_gradients(grads)
        checked = self._checked_gradients(addends)  # all of them, before any sum is written
        first: list[tuple[_Variable, Any]] = []
        kept: list[tuple[_Variable, Any]] = []
        for variable, addend in checked:
            summed_by_kernel = in_kernels and isinstance(variable.update, UpdateKernel)
            (kept if summed_by_kernel else first).append((variable, addend))
        return self._added(grads, first), kept

    def _validated_gradients(self, grads: Mapping[str, Any], allow_empty: bool = False) -> list[tuple[_Variable, Any]]:
        checked = self._checked_gradients(grads, allow_empty)
        return [(variable, self._device_array(grad)) for variable, grad in checked]

    def _checked_gradients(self, grads: Mapping[str, Any], allow_empty: bool = True) -> list[tuple[_Variable, Any]]:
        """The gradients of known variables, of their shapes and dtypes, as given (host arrays)."""
        if not isinstance(grads, Mapping):
            raise InvalidArgumentError(f"Gradients must be a {{name: array}} mapping. Received: {type(grads).__name__}")
        unknown = [name for name in grads if name not in self._variables]
        if unknown:
            raise NotFoundError(
                f"Gradient(s) for unknown variable(s) {describe_names(unknown)}. "
                f"This optimizer holds: {describe_names(list(self._variables))}"
            )
        checked = []
        for name, variable in self._variables.items():
            grad = grads.get(name)
            if grad is None:
                continue  # Keras drops missing gradients; the variable is left alone
            if not (hasattr(grad, "shape") and hasattr(grad, "dtype")):
                grad = np.asarray(grad)
            if tuple(grad.shape) != variable.shape:
                raise InvalidArgumentError(
                    f"Gradient for variable '{name}' has shape {tuple(grad.shape)}; expected {variable.shape}."
                )
            if np.dtype(grad.dtype) != variable.dtype:
                raise InvalidArgumentError(
                    f"Gradient for variable '{name}' has dtype {np.dtype(grad.dtype)}; expected {variable.dtype}."
                )
            checked.append((variable, grad))
        if not checked and not allow_empty:
            raise InvalidArgumentError("No gradients provided for any variable.")
        return checked

    @property
    def _on_host(self) -> bool:
        """Whether the backend's arrays are NumPy arrays in host memory (the CPU backend)."""
        return getattr(self._backend, "xp", None) is np

    def _device_array(self, grad):
        # On the host backend the incoming array is read as is: kernels never
        # write their inputs, so no per-step copy is needed.
        if self._on_host:
            return np.asarray(grad)
        return self._backend.asarray(grad)

    def _learning_rate_for_step(self) -> float:
        lr = self.current_learning_rate()
        if not math.isfinite(lr):
            raise FailedPreconditionError(
                f"The learning rate schedule gives a non-finite learning rate ({lr}) at iteration "
                f"{self._raw_iterations}; nothing was applied."
            )
        return lr

    def _run(self, kernel: UpdateKernel, arrays: dict[str, Any], scalars: dict[str, float]) -> None:
        self._backend.run(kernel, arrays, scalars)

    def _run_all(self, kernel: UpdateKernel, calls: list[dict[str, Any]], scalars: dict[str, float]) -> None:
        """``kernel`` over the arrays of several variables: one pass where the backend can fuse them."""
        run_many = getattr(self._backend, "run_many", None)
        if run_many is None:
            for arrays in calls:
                self._run(kernel, arrays, scalars)
        else:
            run_many(kernel, calls, scalars)

    def add_host_arrays(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        """``total += addend`` for each pair of host arrays (a sync step's sum): on the CPU backend
        as one kernel pass on its threads, elsewhere with NumPy."""
        if self._on_host and pairs:
            self._run_all(ACCUMULATE, [{"grad": addend, "accumulator": total} for total, addend in pairs], {})
            return
        for total, addend in pairs:
            np.add(total, addend, out=total)

    def _update(self, gradients, lr: float, replies=None, written: set[str] | None = None, addends=None) -> None:
        """``replies``: host arrays ``[{name: array}, ...]`` each variable's new value is also written
        into by its update kernel where it can; the names so written are added to ``written``.
        ``addends``: ``{variable: array}`` the update kernel adds to the variable's gradient."""
        gradients = self._clipped(gradients)
        self._apply_weight_decay(gradients, lr)
        self.before_update_step()
        scalars_by_dtype: dict[np.dtype, dict[str, float]] = {}
        # Kernels of one kind and dtype run as one pass over every variable (_run_all).
        fused: dict[tuple[Any, np.dtype], list[dict[str, Any]]] = {}
        for variable, grad, _ in gradients:
            scalars = scalars_by_dtype.get(variable.dtype)
            if scalars is None:
                with np.errstate(all="ignore"):
                    scalars = self.update_scalars(variable.dtype.type, variable.dtype.type(lr))
                scalars_by_dtype[variable.dtype] = scalars
            kernel = variable.update
            if isinstance(kernel, UpdateProgram):
                arrays = {"grad": grad, "var": variable.value, **variable.slots, **variable.program_scratch}
                kernel.run(self._backend, arrays, scalars, variable.dtype.type)
                continue
            brought = {"grad": grad}  # the arrays of this call that are not the variable's own
            addend = addends.get(variable) if addends else None
            if addend is not None:
                kernel = kernel.summing()
                brought[ADDEND] = addend
            if replies and written is not None and self._writes_replies(kernel, grad, addend, variable.name, replies):
                kernel = kernel.copying("var", len(replies))
                for index, values in enumerate(replies):
                    brought[copy_name(index)] = values[variable.name]
                written.add(variable.name)
            fused.setdefault((kernel, variable.dtype), []).append(self._kernel_call(variable, kernel, brought))
        for (kernel, dtype), calls in fused.items():
            self._run_all(kernel, calls, {k: scalars_by_dtype[dtype][k] for k in kernel.scalars})

    def _kernel_call(self, variable: _Variable, kernel: UpdateKernel, brought: dict[str, Any]):
        """The arrays of ``kernel``'s call for ``variable`` (``brought``: the gradient and the other
        arrays that are not the variable's own): where the backend binds state, its value and slots
        bound once (only ``brought`` is checked per call), else all of them."""
        bound = variable.bound
        if bound is None:
            bind_state = getattr(self._backend, "bind_state", None)
            bound = bind_state({"var": variable.value, **variable.slots}) if bind_state is not None else None
            bound = variable.bound = bound or False
        if bound is False:
            arrays = {"var": variable.value, **variable.slots, **brought}
            return {k: arrays[k] for k in kernel.array_names}
        return BoundCall(bound, brought)

    def _writes_replies(self, kernel: UpdateKernel, grad, addend, name: str, replies) -> bool:
        """Whether ``kernel`` can write the variable's reply arrays too: host arrays on the host
        backend, none of them sharing memory with the gradient or its addend (a state array must not)."""
        if not self._on_host or "var" not in kernel.state:
            return False
        for values in replies:
            reply = values[name]
            if np.may_share_memory(reply, grad) or (addend is not None and np.may_share_memory(reply, addend)):
                return False
        return True

    def __repr__(self) -> str:
        lr = "schedule" if self._schedule is not None else self._learning_rate
        return f"<{self.class_name} name={self.name!r} learning_rate={lr} variables={len(self._variables)}>"


def schedules_deserialize(value: Mapping[str, Any]) -> Any:
    """A serialized Keras schedule -> schedule object; any failure is the caller's error."""
    from .. import schedules
    from ..errors import OptserveError

    try:
        return schedules.deserialize(dict(value))
    except OptserveError:
        raise
    except (ValueError, TypeError, KeyError) as error:
        raise InvalidArgumentError(f"Invalid learning rate schedule {dict(value)!r}: {error}") from None
