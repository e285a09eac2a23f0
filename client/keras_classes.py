"""One `RemoteOptimizer` subclass per wrapped Keras optimizer class.

`RemoteOptimizer(keras.optimizers.SGD(), address)` is an instance of
`RemoteSGD`, a subclass of both `RemoteOptimizer` and `keras.optimizers.SGD`,
so code that branches on the optimizer's class (callbacks, Keras's own
`compile`, which wraps anything that is not a `LossScaleOptimizer` in one under
`mixed_float16`) sees the class it expects. The Keras class only answers
`isinstance`: `RemoteOptimizer`'s methods come first in the method order, and
the Keras class's `__init__` never runs (the server runs its math).

Each subclass is created once and serializes as `RemoteOptimizer` does
(registered name `optserve>RemoteOptimizer`); loading picks the subclass again
from the wrapped optimizer's config, so a `.keras` file does not depend on the
process that wrote it.

This module imports Keras; `client/keras_optimizer.py` loads it.
"""

from __future__ import annotations

import keras

__all__ = ["remote_class", "public_class", "keras_base"]

# (RemoteOptimizer or a user's subclass of it, public Keras class) -> the subclass of both.
_REMOTE_CLASSES: dict[tuple[type, type], type] = {}


def public_class(optimizer_class: type) -> type | None:
    """The `keras.optimizers` class an optimizer class is, or derives from, by its public name.

    On the torch backend Keras builds its optimizers from torch-specific
    subclasses (`keras.src.backend.torch.optimizers.torch_adam.Adam`); the
    remote class derives from the public one, the same on every backend.
    """
    for klass in optimizer_class.__mro__:
        public = getattr(keras.optimizers, klass.__name__, None)
        if isinstance(public, type) and issubclass(klass, public):
            if public is keras.optimizers.Optimizer:
                return None
            return public
    return None


def _wrapped_class(optimizer) -> type | None:
    """The Keras class of a `RemoteOptimizer`'s `optimizer` argument; None when it cannot tell."""
    try:
        if isinstance(optimizer, keras.optimizers.Optimizer):
            return public_class(type(optimizer))
        if isinstance(optimizer, str):
            # By name first: creating the optimizer would use up its auto name ("adam" -> "adam_1").
            named = _public_classes_by_name().get(optimizer.lower())
            return named if named is not None else public_class(type(keras.optimizers.get(optimizer)))
        if isinstance(optimizer, dict) and isinstance(optimizer.get("class_name"), str):
            found = getattr(keras.optimizers, optimizer["class_name"], None)
            if isinstance(found, type) and issubclass(found, keras.optimizers.Optimizer):
                return public_class(found)
    except (ValueError, TypeError):
        return None  # RemoteOptimizer's own checks report a bad argument
    return None


def _public_classes_by_name() -> dict[str, type]:
    classes = {}
    for name in dir(keras.optimizers):
        found = getattr(keras.optimizers, name)
        if isinstance(found, type) and issubclass(found, keras.optimizers.Optimizer):
            if found is not keras.optimizers.Optimizer:
                classes[name.lower()] = found
    return classes


def keras_base(remote_class_: type) -> type:
    """The class `RemoteOptimizer`'s chain starts from: the root a remote subclass was made for."""
    return getattr(remote_class_, "_optserve_remote_base", remote_class_)


def remote_class(cls: type, optimizer=None, *_args, **kwargs) -> type:
    """The class a `cls(optimizer, ...)` call creates: `cls`'s subclass for the wrapped Keras class."""
    if optimizer is None:
        optimizer = kwargs.get("optimizer")
    base = keras_base(cls)
    wrapped = _wrapped_class(optimizer)
    if wrapped is None or issubclass(base, wrapped):
        return cls
    key = (base, wrapped)
    if key not in _REMOTE_CLASSES:
        _REMOTE_CLASSES[key] = _new_remote_class(base, wrapped)
    return _REMOTE_CLASSES[key]


def _new_remote_class(base: type, wrapped: type) -> type:
    mixins: tuple[type, ...] = ()
    if issubclass(wrapped, keras.optimizers.LossScaleOptimizer):
        from optserve.client.keras_loss_scale import RemoteLossScaling

        mixins = (RemoteLossScaling,)
    name = f"Remote{wrapped.__name__}"
    remote = type(
        name,
        (*mixins, base, wrapped),
        {"__module__": __name__, "__qualname__": name, "__doc__": base.__doc__, "_optserve_remote_base": base},
    )
    # Saved as the base class is (e.g. `optserve>RemoteOptimizer`), so that loading goes
    # through `base.from_config`, which picks this subclass again. Registering the
    # subclass under that name also points the name at it: the base takes it back.
    registered = keras.saving.get_registered_name(base)
    if ">" in registered:
        package, _, registered_name = registered.partition(">")
        keras.saving.register_keras_serializable(package=package, name=registered_name)(remote)
        keras.saving.register_keras_serializable(package=package, name=registered_name)(base)
    return remote


def _install_loss_scaling_support():
    from optserve.client.keras_loss_scale import allow_eager_jax_loss_scaling

    allow_eager_jax_loss_scaling()


_install_loss_scaling_support()
