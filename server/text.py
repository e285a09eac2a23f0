"""Values in error messages, written the same for a client in any language: JSON, not Python reprs.

A shape is ``[3, 2]`` (not ``(3, 2)``), a config value is JSON (``null``, ``true``,
``{"learning_rate": 0.01}``), a name is a JSON string (``"dense/kernel"``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np


def shape(dims: Iterable[int]) -> str:
    """``[3, 2]``; ``[]`` for a scalar."""
    return "[" + ", ".join(str(int(d)) for d in dims) + "]"


def tensor(dims: Iterable[int], dtype) -> str:
    """``shape [3, 2] float32``."""
    return f"shape {shape(dims)} {np.dtype(dtype).name}"


def value(item: Any) -> str:
    """A value as JSON (NumPy numbers and arrays included); anything else as JSON text of its str()."""
    return json.dumps(item, default=_plain, sort_keys=isinstance(item, dict))


def name(text: str) -> str:
    """A name or identifier as a JSON string: ``"dense/kernel"``."""
    return json.dumps(str(text), ensure_ascii=False)


def _plain(item: Any) -> Any:
    if isinstance(item, np.generic):
        return item.item()
    if isinstance(item, np.ndarray):
        return item.tolist()
    if isinstance(item, (tuple, set, frozenset)):
        return list(item)
    return str(item)
