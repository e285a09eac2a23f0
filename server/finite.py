"""Whether gradients hold a NaN or an infinity (a model's ``non_finite_policy``)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from concurrent.futures import Executor

import numpy as np

# Elements checked for finiteness at a time: a small temporary instead of one the gradient's size.
_CHECK_BLOCK = 1 << 18


# A push this large is checked by two threads: one core alone does not reach memory bandwidth.
PARALLEL_CHECK_BYTES = 4 << 20
_PIECE = 1 << 18  # elements per piece of a parallel check (1 MiB of float32)


def non_finite_names(gradients: Mapping[str, np.ndarray], pool: Executor | None = None) -> list[str]:
    """Names of the gradients holding a NaN or an infinity, in order (executor thread).

    With ``pool``, a large push is checked in pieces shared by this thread and one of the pool's,
    taken from one counter; a helper still queued when this thread ran out of pieces is dropped,
    so a busy pool only means this thread checks more."""
    items = list(gradients.items())
    if pool is None or sum(gradient.nbytes for _, gradient in items) < PARALLEL_CHECK_BYTES:
        return [name for name, gradient in items if not all_finite(gradient)]
    pieces = []
    for index, (_, gradient) in enumerate(items):
        if gradient.dtype.kind == "f":
            flat = gradient.reshape(-1)
            pieces += [(index, flat[low : low + _PIECE]) for low in range(0, flat.size, _PIECE)]
    failed: set[int] = set()
    next_pieces = itertools.count()

    def check() -> None:
        for number in next_pieces:
            if number >= len(pieces):
                break
            index, piece = pieces[number]
            if index not in failed and not all_finite(piece):
                failed.add(index)

    helper = pool.submit(check)
    try:
        check()
    finally:
        if not helper.cancel():
            helper.result()
    return [name for index, (name, _) in enumerate(items) if index in failed]


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
