"""Placement of one model's variables over several parameter-server shards.

    plan = plan_placement({name: (shape, dtype), ...}, num_shards=3)
    per_shard = plan.split(initial_values)        # [{part_name: array}, ...], one dict per shard
    values = plan.join(pulled_per_shard)          # {var_name: array}, the original variables

**Deterministic.** Every worker computes the same plan from the same variables,
whatever order its mapping iterates in: variables are considered by size, ties
broken by name, and all lists in the plan are in name order. ``plan.fingerprint()``
is a short digest for checking that workers agree.

**Size-balanced.** Pieces are placed largest first, each on the shard with the
fewest bytes so far (lowest index on a tie): the classic LPT greedy, whose
largest shard stays close to the mean once no piece is much bigger than
``total / num_shards``.

**Splitting.** A variable of more than ``split_threshold_bytes`` (and at least
two rows) is cut along axis 0 into ``k = min(ceil(nbytes / threshold), rows,
num_shards)`` contiguous row ranges of near-equal size (the first ``rows % k``
ranges get one row more), and its parts always land on ``k`` different shards.
The default threshold is half of a shard's mean share, but never below
``MIN_SPLIT_BYTES``: small variables are not worth the extra messages. Only
axis 0 is cut, so a Keras conv kernel ``(kh, kw, in, out)`` yields at most ``kh``
parts and a 1x1 one stays whole.

**Part names.** An unsplit variable keeps its name. Part ``i`` of a variable split
``k`` ways is named ``"<var_name>#part<i>of<k>"``, e.g. ``"dense/kernel#part0of3"``:
a part from a plan with a different split can never be taken for another part.

Splitting changes what a per-tensor statistic means: with ``clipnorm`` each part
would be clipped by its own norm. Callers that need exact Keras semantics must
keep such variables whole (``split_threshold_bytes`` above the largest variable).
``global_clipnorm`` needs the norm over every shard's variables: the sharded
client takes it in a two-phase step (``optserve.client.two_phase``) and keeps
variables whole so that each variable's sum of squares is exactly one server's.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Piece", "VariableSpec", "ShardPlan", "plan_placement", "MIN_SPLIT_BYTES", "part_name"]

FORMAT_NAME = "optserve-shard-plan"
FORMAT_VERSION = 1
MIN_SPLIT_BYTES = 1 << 20  # below 1 MiB a variable is never split by default
PART_SEPARATOR = "#part"


class VariableSpec(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Piece(NamedTuple):
    """One entry of a shard: a whole variable, or rows ``[row_start, row_stop)`` of one.

    ``row_start``/``row_stop`` are None for a scalar (0-d) variable; ``shape`` is
    the piece's own shape.
    """

    part_name: str
    var_name: str
    row_start: int | None
    row_stop: int | None
    shape: tuple[int, ...]
    nbytes: int

    @property
    def is_whole(self) -> bool:
        return self.part_name == self.var_name


def part_name(var_name: str, index: int, count: int) -> str:
    """Name of part ``index`` of ``var_name`` split ``count`` ways."""
    return f"{var_name}{PART_SEPARATOR}{index}of{count}"


# ---------------------------------------------------------------------------- planning


def plan_placement(
    variables: Mapping[str, Any],
    num_shards: int,
    *,
    split_threshold_bytes: int | None = None,
) -> ShardPlan:
    """Place ``variables`` (``{name: (shape, dtype)}`` or ``{name: array}``) on ``num_shards`` shards."""
    _check_int("num_shards", num_shards, minimum=1)
    if split_threshold_bytes is not None:
        _check_int("split_threshold_bytes", split_threshold_bytes, minimum=1)
    specs = _variable_specs(variables)
    total = sum(spec.nbytes for spec in specs.values())
    threshold = (
        split_threshold_bytes if split_threshold_bytes is not None else default_split_threshold(total, num_shards)
    )
    pieces = [piece for name, spec in specs.items() for piece in _cut(name, spec, threshold, num_shards)]
    _check_unique_part_names(pieces, specs)
    return ShardPlan(num_shards, threshold, specs, _assign(pieces, num_shards))


def default_split_threshold(total_bytes: int, num_shards: int) -> int:
    """Half of a shard's mean share, at least MIN_SPLIT_BYTES (integer math: same on every host)."""
    half_share = -(-total_bytes // (2 * num_shards))
    return max(half_share, MIN_SPLIT_BYTES)


def _variable_specs(variables: Mapping[str, Any]) -> dict[str, VariableSpec]:
    if not isinstance(variables, Mapping):
        raise TypeError(f"`variables` must be a mapping {{name: (shape, dtype)}}. Received: {type(variables).__name__}")
    specs = {}
    for name, value in variables.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"Variable names must be non-empty strings. Received: {name!r}")
        specs[name] = _spec(name, value)
    return dict(sorted(specs.items()))


def _spec(name: str, value: Any) -> VariableSpec:
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # an array or a framework variable
        shape, dtype = value.shape, value.dtype
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        shape, dtype = value
    else:
        raise ValueError(f"Variable {name!r} must be given as (shape, dtype) or an array. Received: {value!r}")
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise ValueError(
            f"Variable {name!r}: shape must be a sequence of integers. Received: shape={shape!r}"
        ) from None
    if any(d < 0 for d in dims) or any(isinstance(d, (bool, np.bool_)) for d in shape):
        raise ValueError(f"Variable {name!r}: shape must hold integers >= 0. Received: shape={shape!r}")
    try:
        if dtype is None:  # np.dtype(None) would silently mean float64
            raise TypeError
        dtype = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"Variable {name!r}: unknown dtype. Received: dtype={dtype!r}") from None
    return VariableSpec(dims, dtype)


def _cut(name: str, spec: VariableSpec, threshold: int, num_shards: int) -> list[Piece]:
    rows = spec.shape[0] if spec.shape else 0
    parts = min(-(-spec.nbytes // threshold), rows, num_shards) if spec.nbytes > threshold else 1
    return _row_ranges(name, spec, parts)


def _row_ranges(name: str, spec: VariableSpec, parts: int) -> list[Piece]:
    """``name`` whole (parts <= 1) or cut into ``parts`` contiguous, near-equal row ranges."""
    if parts <= 1:
        start, stop = (0, spec.shape[0]) if spec.shape else (None, None)
        return [Piece(name, name, start, stop, spec.shape, spec.nbytes)]
    rows = spec.shape[0]
    row_bytes = spec.nbytes // rows
    base, extra = divmod(rows, parts)
    pieces, start = [], 0
    for index in range(parts):
        stop = start + base + (1 if index < extra else 0)
        shape = (stop - start,) + spec.shape[1:]
        pieces.append(Piece(part_name(name, index, parts), name, start, stop, shape, (stop - start) * row_bytes))
        start = stop
    return pieces


def _check_unique_part_names(pieces: list[Piece], specs: Mapping[str, VariableSpec]) -> None:
    seen: dict[str, str] = {}
    for piece in pieces:
        other = seen.get(piece.part_name)
        if other is None and not piece.is_whole and piece.part_name in specs:
            other = piece.part_name
        if other is not None:
            raise ValueError(
                f"Part name {piece.part_name!r} of variable {piece.var_name!r} collides with variable "
                f"{other!r}; rename the variable or raise `split_threshold_bytes` so it is not split."
            )
        seen[piece.part_name] = piece.var_name


def _assign(pieces: list[Piece], num_shards: int) -> list[list[Piece]]:
    loads = [0] * num_shards
    shards: list[list[Piece]] = [[] for _ in range(num_shards)]
    holders: dict[str, set[int]] = {}  # shards already holding a part of each variable
    for piece in sorted(pieces, key=lambda p: (-p.nbytes, p.var_name, p.row_start or 0)):
        taken = holders.setdefault(piece.var_name, set())
        shard = min((i for i in range(num_shards) if i not in taken), key=lambda i: (loads[i], i))
        shards[shard].append(piece)
        loads[shard] += piece.nbytes
        taken.add(shard)
    return [sorted(shard, key=lambda p: (p.var_name, p.row_start or 0)) for shard in shards]


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")


# ---------------------------------------------------------------------------- the plan


class ShardPlan:
    """Where each variable (or each row range of a split variable) lives.

    ``shards[i]`` lists shard ``i``'s pieces in name order; ``variables`` maps
    every variable name (in name order) to its ``VariableSpec``.
    """

    def __init__(
        self,
        num_shards: int,
        split_threshold_bytes: int,
        variables: Mapping[str, VariableSpec],
        shards: list[list[Piece]],
    ):
        self.num_shards = num_shards
        self.split_threshold_bytes = split_threshold_bytes
        self.variables = dict(variables)
        self.shards = shards
        self._location = {piece.part_name: (index, piece) for index, pieces in enumerate(shards) for piece in pieces}
        self._pieces_of: dict[str, list[Piece]] = {}
        for piece in sorted(self._location.values(), key=lambda item: (item[1].var_name, item[1].row_start or 0)):
            self._pieces_of.setdefault(piece[1].var_name, []).append(piece[1])

    def __repr__(self) -> str:
        return (
            f"ShardPlan(num_shards={self.num_shards}, variables={len(self.variables)}, "
            f"pieces={len(self._location)}, loads={self.loads()}, imbalance={self.imbalance():.3f})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShardPlan) and self.to_dict() == other.to_dict()

    # ---------------------------------------------------------------- queries

    def loads(self) -> list[int]:
        """Bytes of variables held by each shard."""
        return [sum(piece.nbytes for piece in pieces) for pieces in self.shards]

    def imbalance(self) -> float:
        """Largest shard's bytes over the mean (1.0 is perfect; 1.0 for an empty model too)."""
        loads = self.loads()
        total = sum(loads)
        return max(loads) * self.num_shards / total if total else 1.0

    def locate(self, var_name: str) -> list[tuple[int, Piece]]:
        """``[(shard_index, piece), ...]`` of one variable, in row order."""
        try:
            pieces = self._pieces_of[var_name]
        except KeyError:
            raise KeyError(f"Variable {var_name!r} is not in this plan.") from None
        return [(self._location[piece.part_name][0], piece) for piece in pieces]

    def is_split(self, var_name: str) -> bool:
        return len(self.locate(var_name)) > 1

    def split_variables(self) -> list[str]:
        """Names of the variables cut into several parts."""
        return [name for name, pieces in self._pieces_of.items() if len(pieces) > 1]

    def shard_of(self, part: str) -> int:
        """Index of the shard holding ``part`` (a part name, or an unsplit variable's name)."""
        try:
            return self._location[part][0]
        except KeyError:
            raise KeyError(f"Part {part!r} is not in this plan.") from None

    # ---------------------------------------------------------------- values

    def split(self, values: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
        """``{var_name: array}`` (all variables or a subset) -> one ``{part_name: array}`` per shard.

        Parts of a split variable are views of its rows, not copies.
        """
        arrays = {}
        for name, value in values.items():
            if name not in self.variables:
                raise ValueError(f"Variable {name!r} is not in this plan.")
            array = np.asarray(value)
            expected = self.variables[name].shape
            if array.shape != expected:
                raise ValueError(f"Variable {name!r} has shape {array.shape}; the plan expects {expected}.")
            arrays[name] = array
        per_shard: list[dict[str, np.ndarray]] = [{} for _ in self.shards]
        for index, pieces in enumerate(self.shards):
            for piece in pieces:
                whole = arrays.get(piece.var_name)
                if whole is None:
                    continue
                rows = whole if piece.is_whole else whole[piece.row_start : piece.row_stop]
                per_shard[index][piece.part_name] = rows
        return per_shard

    def join(self, per_shard: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """One ``{part_name: array}`` per shard -> ``{var_name: array}`` in name order.

        A variable none of whose parts arrived is left out (a subset was pulled);
        one with only some of its parts is an error.
        """
        if len(per_shard) != self.num_shards:
            raise ValueError(f"Expected the parts of {self.num_shards} shards. Received: {len(per_shard)}")
        received: dict[str, np.ndarray] = {}
        for index, parts in enumerate(per_shard):
            for part, value in parts.items():
                home = self._location.get(part)
                if home is None:
                    raise ValueError(f"Part {part!r} from shard {index} is not in this plan.")
                if home[0] != index:
                    raise ValueError(f"Part {part!r} came from shard {index}; the plan places it on shard {home[0]}.")
                received[part] = np.asarray(value)
        values = {}
        for name, pieces in self._pieces_of.items():
            present = [piece for piece in pieces if piece.part_name in received]
            if present:
                values[name] = self._assemble(name, pieces, present, received)
        return values

    def _assemble(
        self, name: str, pieces: list[Piece], present: list[Piece], received: Mapping[str, np.ndarray]
    ) -> np.ndarray:
        if len(present) != len(pieces):
            missing = [piece.part_name for piece in pieces if piece.part_name not in received]
            raise ValueError(f"Variable {name!r} is incomplete: missing parts {missing}.")
        arrays = [received[piece.part_name] for piece in pieces]
        for piece, array in zip(pieces, arrays):
            if array.shape != piece.shape:
                raise ValueError(f"Part {piece.part_name!r} has shape {array.shape}; the plan expects {piece.shape}.")
        if len(arrays) == 1:
            return arrays[0]
        if len({array.dtype for array in arrays}) != 1:
            raise ValueError(f"The parts of variable {name!r} disagree on dtype: {[str(a.dtype) for a in arrays]}.")
        return np.concatenate(arrays, axis=0)

    # ---------------------------------------------------------------- serialization

    def to_dict(self) -> dict:
        """JSON-able form; equal plans give equal dicts on every host."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "num_shards": self.num_shards,
            "split_threshold_bytes": self.split_threshold_bytes,
            "variables": [
                {"name": name, "shape": list(spec.shape), "dtype": spec.dtype.str}
                for name, spec in self.variables.items()
            ],
            "shards": [[_piece_to_dict(piece) for piece in pieces] for pieces in self.shards],
        }

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON form: workers agree on the plan iff their fingerprints match."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardPlan:
        """Inverse of :meth:`to_dict`; checks that the pieces tile every variable exactly."""
        if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"Not a shard plan of format {FORMAT_NAME!r} version {FORMAT_VERSION}. "
                f"Received: format={data.get('format')!r}, version={data.get('version')!r}"
            )
        try:
            specs = {
                entry["name"]: _spec(entry["name"], (entry["shape"], entry["dtype"])) for entry in data["variables"]
            }
            shards = [[_piece_from_dict(entry) for entry in pieces] for pieces in data["shards"]]
            num_shards, threshold = data["num_shards"], data["split_threshold_bytes"]
        except (KeyError, TypeError) as error:
            raise ValueError(f"Malformed shard plan: {error!r}") from None
        _check_int("num_shards", num_shards, minimum=1)
        _check_int("split_threshold_bytes", threshold, minimum=1)
        if len(shards) != num_shards:
            raise ValueError(f"Shard plan lists {len(shards)} shards but num_shards={num_shards}.")
        _check_tiling(specs, shards)
        return cls(num_shards, threshold, dict(sorted(specs.items())), shards)


def _piece_to_dict(piece: Piece) -> dict:
    rows = None if piece.row_start is None else [piece.row_start, piece.row_stop]
    return {
        "part": piece.part_name,
        "variable": piece.var_name,
        "rows": rows,
        "shape": list(piece.shape),
        "nbytes": piece.nbytes,
    }


def _piece_from_dict(entry: Mapping[str, Any]) -> Piece:
    rows = entry["rows"]
    start, stop = (None, None) if rows is None else (int(rows[0]), int(rows[1]))
    return Piece(
        str(entry["part"]),
        str(entry["variable"]),
        start,
        stop,
        tuple(int(d) for d in entry["shape"]),
        int(entry["nbytes"]),
    )


def _check_tiling(specs: Mapping[str, VariableSpec], shards: list[list[Piece]]) -> None:
    """Every variable is covered by its pieces exactly once, in contiguous rows, on distinct shards."""
    by_variable: dict[str, list[tuple[int, Piece]]] = {}
    for index, pieces in enumerate(shards):
        for piece in pieces:
            if piece.var_name not in specs:
                raise ValueError(f"Shard plan piece {piece.part_name!r} names unknown variable {piece.var_name!r}.")
            by_variable.setdefault(piece.var_name, []).append((index, piece))
    for name, spec in specs.items():
        placed = sorted(by_variable.get(name, []), key=lambda item: item[1].row_start or 0)
        pieces = [piece for _, piece in placed]
        tiles = bool(placed) and len(placed) <= max(1, spec.shape[0] if spec.shape else 1)
        if (
            not tiles
            or pieces != _row_ranges(name, spec, len(placed))
            or len({index for index, _ in placed}) != len(placed)
        ):
            raise ValueError(f"Shard plan pieces of variable {name!r} do not tile it exactly once.")
