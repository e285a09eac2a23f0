"""optserve clients: the plain NumPy :class:`Client` and the Keras ``RemoteOptimizer``.

``RemoteOptimizer`` is loaded on first access, so ``import optserve.client``
never imports Keras (nor the server, nor CuPy).
"""

from __future__ import annotations

from optserve.client import client as _client
from optserve.client.client import *  # noqa: F401,F403 - the public names listed in client.__all__

_LAZY = {
    "RemoteOptimizer": ("optserve.client.keras_optimizer", "RemoteOptimizer"),
    "TFKerasRemoteOptimizer": ("optserve.client.tf_keras_optimizer", "RemoteOptimizer"),
    "ShardedClient": ("optserve.client.sharded", "ShardedClient"),
}

__all__ = [*_client.__all__, *_LAZY]


def __getattr__(name: str):
    # Keras is heavy and optional: import it only when RemoteOptimizer (or the
    # tf_keras one, TFKerasRemoteOptimizer) is asked for.
    # (ShardedClient is reached through Client(addresses) anyway; exported for isinstance checks.)
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
