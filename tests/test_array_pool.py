"""ArrayPool: reused arrays, never one somebody still holds."""

import gc

import numpy as np
import pytest

from optserve.protos.buffers import ArrayPool


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_an_array_is_reused_once_nothing_refers_to_it():
    pool = ArrayPool()
    first = pool.empty("w", (8,), np.float32)
    address = _address(first)
    del first
    again = pool.empty("w", (8,), np.float32)
    assert _address(again) == address
    assert again.shape == (8,) and again.dtype == np.float32 and again.flags.writeable


@pytest.mark.parametrize(
    "derive",
    [lambda a: a[2:], lambda a: a.reshape(2, 4), memoryview, lambda a: a],
    ids=["slice", "view", "memoryview", "self"],
)
def test_a_held_array_or_anything_made_from_it_is_never_handed_out(derive):
    pool = ArrayPool(keep=2)
    first = pool.empty("w", (8,), np.float32)
    address = _address(first)
    holder = derive(first)
    del first
    others = [pool.empty("w", (8,), np.float32) for _ in range(3)]
    assert address not in {_address(other) for other in others}
    del others, holder
    gc.collect()
    assert address in {_address(pool.empty("w", (8,), np.float32)) for _ in range(2)}


def test_keys_shapes_and_dtypes_do_not_mix_and_forget_drops_kept_arrays():
    pool = ArrayPool()
    a = pool.empty(("m", "w"), (4,), np.float32)
    address = _address(a)
    del a
    b = pool.empty(("m", "w"), (4,), np.float64)
    c = pool.empty(("other", "w"), (4,), np.float32)
    assert address not in (_address(b), _address(c))
    assert b.dtype == np.float64
    del b, c
    assert pool.kept_bytes() > 0
    pool.forget(lambda key: key[0] == "m")
    assert pool.kept_bytes() == 4 * 4  # only ("other", "w") is kept
    pool.clear()
    assert pool.kept_bytes() == 0


def test_beyond_keep_arrays_are_made_but_not_kept():
    pool = ArrayPool(keep=1)
    held = [pool.empty("w", (1024,), np.float32) for _ in range(3)]
    assert len({_address(a) for a in held}) == 3
    assert pool.kept_bytes() == 1024 * 4


def test_parallel_copies_copy_every_byte():
    from optserve.protos.buffers import copy_in_parallel

    rng = np.random.default_rng(0)
    sources = [rng.standard_normal(size).astype(np.float32) for size in (3, (1 << 20) + 7, 3 * (1 << 20) + 1)]
    sources.append(rng.standard_normal((513, 1025)))
    targets = [np.zeros_like(source) for source in sources]
    copy_in_parallel(list(zip(targets, sources)))
    for target, source in zip(targets, sources):
        np.testing.assert_array_equal(target, source, strict=True)
