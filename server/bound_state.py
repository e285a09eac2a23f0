"""A variable's state arrays checked once, so that each step checks only what is new in it.

Every kernel call is checked before it writes anything (``backends.check_kernel_arrays``,
``check_no_overlap``): one dtype and shape for all arrays, state C-contiguous and writeable, no
state array sharing memory with another array. Most of a call's arrays are a variable's value
and slots, the same arrays at every step, and checking them again at every step costs more than
updating a small variable does. A :class:`BoundState` holds them checked once, with their data
addresses and byte ranges. A :class:`BoundCall` then brings only the arrays that are new at each
step (the gradient, its addend, the reply arrays the update writes), and only those are checked,
each against the bound arrays the kernel uses, as the full check would. A call that the quick
check does not pass goes through the full check, which names what is wrong, so both refuse
exactly the same calls.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from optserve.server.kernels import SUPPORTED_DTYPES

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # NumPy < 2
    byte_bounds = np.byte_bounds  # type: ignore[attr-defined]

# id(array) -> (a weak reference to it, its data address); an entry goes with its array.
_ADDRESSES: dict[int, tuple[weakref.ref, int]] = {}


def data_address(array: np.ndarray) -> int:
    """``array.ctypes.data``, remembered for as long as the array lives: the arrays a step brings
    are often the same from step to step (a session's regions), and ``ctypes`` costs microseconds.
    Only views are remembered: an array owning its memory could be resized in place (a view, or an
    array with views, cannot)."""
    if array.base is None:
        return array.ctypes.data
    key = id(array)
    entry = _ADDRESSES.get(key)
    if entry is not None and entry[0]() is array:
        return entry[1]
    address = array.ctypes.data
    _ADDRESSES[key] = (weakref.ref(array, functools.partial(_forget_address, key)), address)
    return address


def _forget_address(key: int, _reference: weakref.ref) -> None:
    _ADDRESSES.pop(key, None)  # the array is going: its id may be another's next


class BoundCall(NamedTuple):
    """One kernel call: the bound arrays it uses, and ``arrays``, the others by kernel name."""

    state: BoundState
    arrays: Mapping[str, Any]


class _Layout(NamedTuple):
    """Where one kernel's arrays come from: the bound ones in place, the call's to fill in."""

    ordered: tuple  # the kernel's arrays in order, None where the call brings the array
    addresses: tuple  # their data addresses, likewise
    ranges: tuple  # (low, high) byte ranges of the bound arrays the kernel uses
    entries: tuple  # (position, name, is_state) of each array the call brings


class BoundState:
    """Arrays that are a kernel's state at every call (a variable's value and slots), checked once.

    Made by :func:`bind`; the arrays must stay where they are (they are never reallocated)."""

    __slots__ = ("arrays", "dtype", "shape", "_addresses", "_layouts", "last_checked")

    def __init__(self, arrays: dict[str, np.ndarray], addresses: dict[str, int]):
        first = next(iter(arrays.values()))
        self.arrays = arrays
        self.dtype, self.shape = first.dtype, first.shape
        self._addresses = addresses
        self._layouts: dict = {}
        # kernel -> (weak references to the arrays its last call brought, want_addresses, addresses):
        # a session's pushes bring the same arrays step after step, which need no second check.
        self.last_checked: dict = {}

    def layout(self, kernel) -> _Layout:
        layout = self._layouts.get(kernel)
        if layout is None:
            layout = self._layouts[kernel] = self._new_layout(kernel)
        return layout

    def _new_layout(self, kernel) -> _Layout:
        ordered: list = []
        addresses: list = []
        ranges: list = []
        entries: list = []
        nbytes = next(iter(self.arrays.values())).nbytes
        for position, name in enumerate(kernel.array_names):
            is_state = position >= len(kernel.inputs)
            if is_state and name in self.arrays:
                ordered.append(self.arrays[name])
                address = self._addresses[name]
                addresses.append(address)
                ranges.append((address, address + nbytes))
            else:
                ordered.append(None)
                addresses.append(None)
                entries.append((position, name, is_state))
        return _Layout(tuple(ordered), tuple(addresses), tuple(ranges), tuple(entries))

    def full_arrays(self, kernel, call_arrays: Mapping[str, Any]) -> dict[str, Any]:
        """The call as the dict the full check takes: the bound arrays the kernel uses, and the call's."""
        names = kernel.array_names[len(kernel.inputs) :]
        arrays = {name: self.arrays[name] for name in names if name in self.arrays and name not in call_arrays}
        arrays.update(call_arrays)
        return arrays


def bind(arrays: Mapping[str, Any]) -> BoundState | None:
    """The arrays checked as kernel state, or None where they would not all pass as one kernel's
    state (not NumPy arrays of one supported dtype and non-empty shape, not C-contiguous and
    writeable, sharing memory): their calls then go through the full check."""
    arrays = dict(arrays)
    if not arrays:
        return None
    first = next(iter(arrays.values()))
    if not isinstance(first, np.ndarray) or first.dtype not in SUPPORTED_DTYPES or first.size == 0:
        return None
    addresses = {}
    for name, array in arrays.items():
        if not isinstance(array, np.ndarray) or array.dtype != first.dtype or array.shape != first.shape:
            return None
        if not (array.flags.c_contiguous and array.flags.writeable):
            return None
        addresses[name] = array.ctypes.data
    spans = sorted((address, address + first.nbytes) for address in addresses.values())
    if any(high > low for (_, high), (low, _) in zip(spans, spans[1:])):
        return None  # two of them share memory
    return BoundState(arrays, addresses)


def checked(kernel, call: BoundCall, want_addresses: bool) -> tuple[list, np.dtype, list | None] | None:
    """(the call's arrays in kernel order, their dtype, their data addresses where
    ``want_addresses`` (None for an input that is not C-contiguous)), as the full check returns
    them; None where the quick check does not pass (the full check then decides)."""
    state = call.state
    layout = state.layout(kernel)
    brought = call.arrays
    if len(brought) != len(layout.entries):
        return None
    last = state.last_checked.get(kernel)
    if last is not None and last[1] == want_addresses and _same_arrays(layout, state, brought, last[0]):
        ordered = list(layout.ordered)
        for position, name, _ in layout.entries:
            ordered[position] = brought[name]
        return ordered, state.dtype, last[2]
    result = _checked(layout, state, brought, want_addresses)
    if result is not None:
        references = tuple(weakref.ref(result[0][position]) for position, _, _ in layout.entries)
        state.last_checked[kernel] = (references, want_addresses, result[2])  # the addresses: plain numbers
    return result


def _same_arrays(layout: _Layout, state: BoundState, brought: Mapping[str, Any], references: tuple) -> bool:
    """Whether the call brings the very arrays the last checked call did (the same memory), still
    of the state's shape and dtype, its state arrays still writeable. Weak references: holding the
    arrays would keep an array pool from handing them out again."""
    shape, dtype = state.shape, state.dtype
    for (_, name, is_state), reference in zip(layout.entries, references):
        array = brought.get(name)
        if array is None or reference() is not array or array.shape != shape or array.dtype != dtype:
            return False
        if is_state and not array.flags.writeable:
            return False
    return True


def _checked(layout: _Layout, state: BoundState, brought: Mapping[str, Any], want_addresses: bool):
    dtype, shape = state.dtype, state.shape
    ordered = list(layout.ordered)
    addresses = list(layout.addresses) if want_addresses else None
    new: list = []  # (low, high, is_state, array) of each array the call brings
    for position, name, is_state in layout.entries:
        array = brought.get(name)
        if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != shape:
            return None
        flags = array.flags
        if flags.c_contiguous:
            address = data_address(array)
            low, high = address, address + array.nbytes
        elif is_state:
            return None
        else:
            address = None
            low, high = byte_bounds(array)
        if is_state and not flags.writeable:
            return None
        ordered[position] = array
        if addresses is not None:
            addresses[position] = address
        new.append((low, high, is_state, array))
    for index, (low, high, is_state, array) in enumerate(new):
        # Every array the call brings against the bound state; the call's state against the rest.
        for bound_low, bound_high in layout.ranges:
            if low < bound_high and bound_low < high:
                return None
        if is_state:
            for other_index, (other_low, other_high, _, other) in enumerate(new):
                if other_index != index and (other is array or (low < other_high and other_low < high)):
                    return None
    return ordered, dtype, addresses
