"""Whether gradients hold a NaN or an infinity (a model's ``non_finite_policy``)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# Elements checked for finiteness at a time: a small temporary instead of one the gradient's size.
_CHECK_BLOCK = 1 << 18


def non_finite_names(gradients: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the gradients holding a NaN or an infinity, in order (executor thread)."""
    return [name for name, gradient in gradients.items() if not all_finite(gradient)]


def all_finite(array: np.ndarray) -> bool:
    if array.dtype.kind != "f":
        return True
    flat = array.reshape(-1)
    with np.errstate(all="ignore"):
        # Fast path: a NaN or an infinity makes the sum of squares NaN or infinite, so a finite
        # one proves every element finite. An infinite one may be an overflow of large finite
        # values: the exact check decides.
        if np.isfinite(np.dot(flat, flat)):
            return True
    return all(np.isfinite(flat[start : start + _CHECK_BLOCK]).all() for start in range(0, flat.size, _CHECK_BLOCK))
