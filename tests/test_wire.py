"""The wire contract: generated code is fresh, and the tensor codec round-trips exactly."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from optserve.protos import optserve_pb2 as pb
from optserve.protos import tensors

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_generated_code_is_not_stale():
    pytest.importorskip("grpc_tools", reason="grpcio-tools is needed to regenerate the stubs")
    run = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int32", "int64"])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 4), (2, 3, 5)])
def test_round_trip_small(dtype, shape):
    array = (np.arange(int(np.prod(shape))).reshape(shape) * 3 - 7).astype(dtype)
    out = tensors.decode_all(tensors.encode("w", array, slot="momentum"))
    (key, value), = out.items()
    assert key == ("w", "momentum")
    assert value.dtype == array.dtype and value.shape == array.shape
    np.testing.assert_array_equal(value, array)
    assert value.flags.writeable


def test_large_tensor_is_chunked_and_reassembled():
    array = np.random.default_rng(0).standard_normal(700_000).astype(np.float32)  # 2.8 MB
    chunks = list(tensors.encode("big", array, chunk_bytes=1 << 20))
    assert len(chunks) == 3
    assert all(len(c.data) <= 1 << 20 for c in chunks)
    assert [c.offset for c in chunks] == [0, 1 << 20, 2 << 20]
    np.testing.assert_array_equal(tensors.decode_all(chunks)[("big", "")], array)


def test_big_endian_input_is_sent_little_endian():
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    chunk, = tensors.encode("x", array)
    assert chunk.data == np.arange(6, dtype="<f4").tobytes()
    np.testing.assert_array_equal(tensors.decode_all([chunk])[("x", "")], array)


def test_batches_respect_the_byte_budget():
    chunks = tensors.encode_many((f"v{i}", "", np.zeros(100_000, np.float32)) for i in range(10))
    batches = list(tensors.batch_chunks(chunks, max_bytes=1 << 20))
    assert [len(b) for b in batches] == [2, 2, 2, 2, 2]
    assert all(sum(len(c.data) for c in b) <= 1 << 20 for b in batches)


def _chunk(**kw):
    base = dict(name="w", dtype=pb.FLOAT32, shape=[2], offset=0, data=b"\0" * 8)
    base.update(kw)
    return pb.TensorChunk(**base)


@pytest.mark.parametrize("chunk, message", [
    (_chunk(dtype=pb.DTYPE_UNSPECIFIED), "dtype"),
    (_chunk(data=b"\0" * 12), "12 bytes received"),
    (_chunk(offset=4), "offset 0"),
    (_chunk(shape=[-1]), "negative"),
])
def test_malformed_chunks_are_rejected(chunk, message):
    with pytest.raises(tensors.TensorFormatError, match=message):
        tensors.decode_all([chunk])


def test_incomplete_tensor_is_rejected():
    with pytest.raises(tensors.TensorFormatError, match="only 4 of 8 bytes"):
        tensors.decode_all([_chunk(data=b"\0" * 4)])


def test_total_size_limit():
    assembler = tensors.TensorAssembler(max_total_bytes=4)
    with pytest.raises(tensors.TensorFormatError, match="limit of 4 bytes"):
        assembler.add(_chunk())


def test_unsupported_dtype_names_the_allowed_ones():
    with pytest.raises(tensors.TensorFormatError, match="allowed: float16, float32"):
        list(tensors.encode("c", np.zeros(2, np.complex64)))
