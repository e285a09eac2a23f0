"""The stages of Keras's apply pipeline around an optimizer's own update.

Loss-scale division, gradient accumulation, clipping (``clipnorm`` /
``global_clipnorm`` / ``clipvalue``), decoupled weight decay and the EMA of the
variables, each an ``UpdateKernel`` run on the optimizer's backend with the
scalars Keras computes (on the host, in the variable's dtype). ``GradientStages``
is a part of ``Optimizer`` (``optimizers/base.py``, where ``apply`` runs them in
Keras's order), split out by topic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..kernels import UpdateKernel

if TYPE_CHECKING:
    from .base import _Variable

EMA_SLOT = "average"
ACCUMULATOR_SLOT = "gradient_accumulator"


def _pipeline_kernels(name: str, expression: str, scalars: tuple[str, ...]):
    """The same gradient transform twice: into an owned buffer, and in place."""
    copying = UpdateKernel(
        name=f"{name}_into",
        inputs=("grad",),
        state=("out",),
        scalars=scalars,
        body=f"out = {expression}\n",
    )
    in_place = UpdateKernel(
        name=f"{name}_in_place",
        inputs=(),
        state=("grad",),
        scalars=scalars,
        body=f"grad = {expression}\n",
    )
    return copying, in_place


# Keras divides (`g / scale`), it does not multiply by the reciprocal.
UNSCALE = UpdateKernel(
    name="loss_unscale",
    inputs=("grad",),
    state=("out",),
    scalars=("loss_scale",),
    body="out = grad / loss_scale\n",
)
ACCUMULATE = UpdateKernel(
    name="accumulate_gradient",
    inputs=("grad",),
    state=("accumulator",),
    scalars=(),
    body="accumulator = accumulator + grad\n",
)
ACCUMULATE_UNSCALED = UpdateKernel(
    name="accumulate_unscaled_gradient",
    inputs=("grad",),
    state=("accumulator",),
    scalars=("loss_scale",),
    body="accumulator = accumulator + grad / loss_scale\n",
)
# On the k-th call the accumulator becomes the gradient the update uses.
ACCUMULATED_MEAN = UpdateKernel(
    name="accumulated_mean",
    inputs=("grad",),
    state=("accumulator",),
    scalars=("steps",),
    body="accumulator = (grad + accumulator) / steps\n",
)
ACCUMULATED_MEAN_UNSCALED = UpdateKernel(
    name="accumulated_mean_unscaled",
    inputs=("grad",),
    state=("accumulator",),
    scalars=("steps", "loss_scale"),
    body="accumulator = (grad / loss_scale + accumulator) / steps\n",
)
RESET = UpdateKernel(name="reset_to_zero", inputs=(), state=("buffer",), scalars=(), body="buffer = 0\n")
# Keras: values * clipnorm / maximum(l2norm, clipnorm), with the norm on the host.
CLIP_BY_NORM = _pipeline_kernels("clip_by_norm", "grad * clipnorm / norm_or_clipnorm", ("clipnorm", "norm_or_clipnorm"))
SCALE_BY_GLOBAL_NORM = _pipeline_kernels("clip_by_global_norm", "grad * scale", ("scale",))
CLIP_BY_VALUE = _pipeline_kernels("clip_by_value", "clip(grad, -clipvalue, clipvalue)", ("clipvalue",))
WEIGHT_DECAY = UpdateKernel(
    name="decoupled_weight_decay",
    inputs=(),
    state=("var",),
    scalars=("weight_decay", "lr"),
    body="var = var - var * weight_decay * lr\n",
)
EMA = UpdateKernel(
    name="exponential_moving_average",
    inputs=("var",),
    state=("average",),
    scalars=("ema_momentum",),
    body="average = ema_momentum * average + (1 - ema_momentum) * var\n",
)


class GradientStages:
    """Loss scale, accumulation, clipping, weight decay and EMA, as stages of ``Optimizer.apply``.

    Each gradient travels between stages as ``(variable, array, owned)``: ``owned`` says the array
    is a buffer of the optimizer that later stages may overwrite.
    """

    if TYPE_CHECKING:  # provided by Optimizer
        _backend: Any
        _config: dict[str, Any]
        _variables: dict[str, _Variable]
        dynamic_loss_scale: float | None
        joint_norm_terms: tuple[Any, list[float]] | None

        @property
        def iterations(self) -> int: ...

        def _require_built(self) -> None: ...

        def _run(self, kernel: UpdateKernel, arrays: dict[str, Any], scalars: dict[str, float]) -> None: ...

        def weight_decay_for(self, name: str, shape: tuple) -> float | None: ...

        def _uses_weight_decay(self, name: str) -> bool: ...

    # ------------------------------------------------------- scale, accumulate
    def _loss_scale(self) -> float | None:
        scale = self._config["loss_scale_factor"]
        return self.dynamic_loss_scale if scale is None else scale

    def _unscaled(self, gradients):
        scale = self._loss_scale()
        if scale is None:
            return [(variable, grad, False) for variable, grad in gradients]
        for variable, grad in gradients:
            self._run(UNSCALE, {"grad": grad, "out": variable.scratch}, {"loss_scale": scale})
        return [(variable, variable.scratch, True) for variable, _ in gradients]

    def _accumulate(self, gradients) -> None:
        scale = self._loss_scale()
        for variable, grad in gradients:
            arrays = {"grad": grad, "accumulator": variable.slots[ACCUMULATOR_SLOT]}
            if scale is None:
                self._run(ACCUMULATE, arrays, {})
            else:
                self._run(ACCUMULATE_UNSCALED, arrays, {"loss_scale": scale})

    def _accumulated_means(self, gradients, steps: int):
        scale = self._loss_scale()
        means = []
        for variable, grad in gradients:
            accumulator = variable.slots[ACCUMULATOR_SLOT]
            arrays = {"grad": grad, "accumulator": accumulator}
            if scale is None:
                self._run(ACCUMULATED_MEAN, arrays, {"steps": steps})
            else:
                self._run(ACCUMULATED_MEAN_UNSCALED, arrays, {"steps": steps, "loss_scale": scale})
            means.append((variable, accumulator, True))
        return means

    def _reset_accumulators(self) -> None:
        # Keras zeroes every accumulator, also those of variables without a gradient now.
        for variable in self._variables.values():
            self._run(RESET, {"buffer": variable.slots[ACCUMULATOR_SLOT]}, {})

    # ---------------------------------------------------------------- clipping
    def _clipped(self, gradients):
        config = self._config
        if not gradients:
            return gradients  # an empty step: no norm to take
        if config["clipnorm"] is not None:
            return [self._clip_by_norm(variable, grad, owned) for variable, grad, owned in gradients]
        if config["global_clipnorm"] is not None:
            return self._clip_by_global_norm(gradients)
        if config["clipvalue"] is not None:
            limit = {"clipvalue": config["clipvalue"]}
            return [self._transform(CLIP_BY_VALUE, variable, grad, owned, limit) for variable, grad, owned in gradients]
        return gradients

    def _transform(self, kernels, variable: _Variable, grad, owned: bool, scalars: dict[str, float]):
        copying, in_place = kernels
        if owned:
            self._run(in_place, {"grad": grad}, scalars)
            return variable, grad, True
        self._run(copying, {"grad": grad, "out": variable.scratch}, scalars)
        return variable, variable.scratch, True

    def _clip_by_norm(self, variable: _Variable, grad, owned: bool):
        # Keras: l2norm = sqrt(sum(g^2)) when the sum is > 0, else the sum itself
        # (0, or NaN that then propagates); g * clipnorm / maximum(l2norm, clipnorm).
        dtype = variable.dtype.type
        clipnorm = dtype(self._config["clipnorm"])
        with np.errstate(all="ignore"):
            l2sum = dtype(self._backend.sum_squares(grad))
            l2norm = np.sqrt(l2sum) if l2sum > 0 else l2sum
            denominator = np.maximum(l2norm, clipnorm)
        scalars = {"clipnorm": float(clipnorm), "norm_or_clipnorm": float(denominator)}
        return self._transform(CLIP_BY_NORM, variable, grad, owned, scalars)

    def _clip_by_global_norm(self, gradients):
        # Keras: scale = clip * minimum(1 / norm, 1 / clip) + (norm - norm), in
        # the gradients' common dtype; a non-finite norm makes every gradient NaN.
        # A shard of a sharded model gets every shard's sums (optserve.server.two_phase).
        joint = self.joint_norm_terms
        if joint is None:
            dtype = np.result_type(*(variable.dtype for variable, _, _ in gradients)).type
            sums = [self._backend.sum_squares(grad) for _, grad, _ in gradients]
        else:
            dtype, sums = joint
        clip_norm = self._config["global_clipnorm"]
        with np.errstate(all="ignore"):
            # np.sum over the stacked per-tensor sums, as Keras adds them.
            squared = np.sum(np.array(sums, dtype=dtype))
            norm = np.sqrt(squared)
            scale = dtype(clip_norm) * np.minimum(dtype(1.0) / norm, dtype(1.0 / clip_norm)) + (norm - norm)
        scalars = {"scale": float(scale)}
        return [
            self._transform(SCALE_BY_GLOBAL_NORM, variable, grad, owned, scalars) for variable, grad, owned in gradients
        ]

    # ------------------------------------------------------------- decay, EMA
    def _apply_weight_decay(self, gradients, lr: float) -> None:
        for variable, _, _ in gradients:
            weight_decay = self.weight_decay_for(variable.name, variable.shape)
            if weight_decay is not None and self._uses_weight_decay(variable.name):
                self._run(WEIGHT_DECAY, {"var": variable.value}, {"weight_decay": weight_decay, "lr": lr})

    def _update_moving_averages(self) -> None:
        # Keras averages every variable, also those without a gradient this call;
        # the first average (public iterations == 0) is the variable itself.
        first_step = self.iterations == 0
        for variable in self._variables.values():
            dtype = variable.dtype.type
            momentum = dtype(0.0) if first_step else dtype(self._config["ema_momentum"])
            arrays = {"var": variable.value, "average": variable.slots[EMA_SLOT]}
            self._run(EMA, arrays, {"ema_momentum": float(momentum)})
        frequency = self._config["ema_overwrite_frequency"]
        if frequency and (self.iterations + 1) % frequency == 0:
            for variable in self._variables.values():
                self._backend.copy_into(variable.value, variable.slots[EMA_SLOT])

    def finalize_variable_values(self) -> None:
        """Keras's end-of-training step: with ``use_ema``, variables take their averages."""
        self._require_built()
        if self._config["use_ema"]:
            for variable in self._variables.values():
                self._backend.copy_into(variable.value, variable.slots[EMA_SLOT])
