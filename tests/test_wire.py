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
    run = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int32", "int64"])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 4), (2, 3, 5)])
def test_round_trip_small(dtype, shape):
    array = (np.arange(int(np.prod(shape))).reshape(shape) * 3 - 7).astype(dtype)
    out = tensors.decode_all(tensors.encode("w", array, slot="momentum"))
    ((key, value),) = out.items()
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
    (chunk,) = tensors.encode("x", array)
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


@pytest.mark.parametrize(
    "chunk, message",
    [
        (_chunk(dtype=pb.DTYPE_UNSPECIFIED), "dtype"),
        (_chunk(data=b"\0" * 12), "12 bytes received"),
        (_chunk(offset=4), "offset 0"),
        (_chunk(shape=[-1]), "negative"),
    ],
)
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


# ------------------------------------------------------------------ wire bytes split by hand


def _mixed_tensors():
    rng = np.random.default_rng(1)
    return [
        ("big", "", rng.standard_normal(300_001).astype(np.float32)),  # 1.2 MB: spans chunks, odd size
        ("m", "momentum", np.arange(7, dtype=">f8")),  # big-endian input
        ("i", "", np.arange(-5, 5, dtype=">i8").reshape(2, 5)),
        ("empty", "", np.zeros((0, 4), np.float32)),
        ("scalar", "", np.float64(2.5)),
        ("half", "", np.linspace(-1, 1, 9, dtype=np.float16)),
        *[(f"small{i}", "", np.full(1000, i, np.int32)) for i in range(30)],
    ]


def _first():
    return pb.PullResponse(state=pb.StepResult(step=4, contributors=[0, 2]))


def _as_tuple(chunk):
    return chunk.name, chunk.slot, chunk.dtype, tuple(chunk.shape), chunk.offset, bytes(chunk.data)


@pytest.fixture(params=["by size", "always by hand"])
def split_path(request, monkeypatch):
    """Run a test with the size thresholds as shipped, and with every message split by hand."""
    if request.param == "always by hand":
        monkeypatch.setattr(tensors, "SPLIT_MIN_BYTES", 0)
        monkeypatch.setattr(tensors, "SPLIT_MIN_AVERAGE_CHUNK_BYTES", 1)
    return request.param


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 4096, 1000])
def test_split_message_holds_what_protobuf_parses(split_path, chunk_bytes):
    wire = list(tensors.serialized_chunk_messages(_first(), "variables", _mixed_tensors(), chunk_bytes))
    for raw in wire:
        expected = pb.PullResponse.FromString(raw)
        message, chunks = tensors.split_message(raw, pb.PullResponse, "variables")
        assert [_as_tuple(c) for c in chunks] == [_as_tuple(c) for c in expected.variables]
        expected.ClearField("variables")
        assert message == expected


def test_large_messages_are_split_into_payload_views():
    (raw,) = tensors.serialized_chunk_messages(_first(), "variables", [("w", "", np.ones(100_000, np.float32))])
    message, (chunk,) = tensors.split_message(raw, pb.PullResponse, "variables")
    assert isinstance(chunk, tensors.WireChunk) and isinstance(chunk.data, memoryview)
    assert chunk.data.obj is raw  # a view, not a copy
    assert message.state.step == 4 and not message.variables


def test_many_small_chunks_go_through_protobuf():
    tensors_list = [(f"v{i}", "", np.zeros(4, np.float32)) for i in range(5000)]  # ~150 KB, 5000 chunks
    (raw,) = tensors.serialized_chunk_messages(_first(), "variables", tensors_list)
    assert len(raw) >= tensors.SPLIT_MIN_BYTES
    _, chunks = tensors.split_message(raw, pb.PullResponse, "variables")
    assert len(chunks) == 5000 and isinstance(chunks[0], pb.TensorChunk)


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 4096, 4000, 1000])
def test_split_chunks_reassemble_exactly(split_path, chunk_bytes):
    assembler = tensors.TensorAssembler()
    heads = []
    for raw in tensors.serialized_chunk_messages(_first(), "variables", _mixed_tensors(), chunk_bytes):
        message, chunks = tensors.split_message(raw, pb.PullResponse, "variables")
        heads.append(message)
        assembler.add_all(chunks)
    out = assembler.result()
    assert heads[0].state.step == 4 and all(not h.HasField("state") for h in heads[1:])
    assert list(out) == [(name, slot) for name, slot, _ in _mixed_tensors()]
    for name, slot, array in _mixed_tensors():
        value = out[(name, slot)]
        assert value.dtype == array.dtype.newbyteorder("=") and value.dtype.isnative
        assert value.shape == np.shape(array) and value.flags.writeable
        np.testing.assert_array_equal(value, array)


@pytest.mark.parametrize("elements", [262_143, 262_144, 262_145, 524_288])
def test_chunk_boundaries(elements):
    """Tensors just under, at and over one chunk, and exactly two: offsets and sizes line up."""
    array = np.arange(elements, dtype=np.float32)
    wire = list(tensors.serialized_chunk_messages(_first(), "variables", [("w", "", array)], 1 << 20))
    chunks = [c for raw in wire for c in tensors.split_message(raw, pb.PullResponse, "variables")[1]]
    assert len(chunks) == -(-array.nbytes // (1 << 20))
    assert [c.offset for c in chunks] == [i << 20 for i in range(len(chunks))]
    assert sum(len(c.data) for c in chunks) == array.nbytes
    np.testing.assert_array_equal(tensors.decode_all(chunks)[("w", "")], array)


def test_split_keeps_protobuf_semantics_for_repeated_fields(split_path):
    """Concatenated encodings merge: the last ``data`` wins and other fields keep their last value."""
    chunk = (
        pb.TensorChunk(name="w", dtype=pb.FLOAT32, shape=[2], data=b"\1" * 8).SerializeToString()
        + pb.TensorChunk(data=b"\2" * 8).SerializeToString()
    )
    raw = (
        pb.PullResponse(state=pb.StepResult(step=1)).SerializeToString()
        + b"\x12"
        + tensors._varint(len(chunk))
        + chunk
        + pb.PullResponse(state=pb.StepResult(iterations=9)).SerializeToString()
    )
    expected = pb.PullResponse.FromString(raw)
    message, chunks = tensors.split_message(raw, pb.PullResponse, "variables")
    assert [_as_tuple(c) for c in chunks] == [_as_tuple(c) for c in expected.variables]
    assert bytes(chunks[0].data) == b"\2" * 8
    assert message.state.step == 1 and message.state.iterations == 9


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda raw: raw[:-3], "truncated|Malformed"),
        (lambda raw: raw + b"\x83", "truncated|Malformed"),
        (lambda raw: raw + b"\x0b", "wire type|Malformed"),  # a group, which proto3 never sends
        (lambda raw: raw.replace(b"\x0a\x01w", b"\x0a\x01\xff", 1), "UTF-8|Malformed"),
    ],
)
def test_malformed_wire_bytes_raise_tensor_format_errors(split_path, mangle, message):
    (raw,) = tensors.serialized_chunk_messages(
        pb.PullResponse(), "variables", [("w", "", np.ones(100_000, np.float32))]
    )
    with pytest.raises(tensors.TensorFormatError, match=message):
        tensors.split_message(mangle(raw), pb.PullResponse, "variables")


def test_split_deserializer_reads_like_the_message():
    header = pb.ApplyGradientsHeader(model_id="m", step=3)
    gradient = np.arange(100_000, dtype=np.float32)
    first, second = tensors.serialized_chunk_messages(
        pb.ApplyGradientsRequest(header=header), "gradients", [("w", "", gradient)], chunk_bytes=200_000
    )
    deserialize = tensors.split_deserializer(pb.ApplyGradientsRequest, "gradients")
    request, later = deserialize(first), deserialize(second)
    assert request.HasField("header") and request.header.step == 3 and not later.HasField("header")
    assembler = tensors.TensorAssembler()
    assembler.add_all(request.gradients)
    assembler.add_all(later.gradients)
    np.testing.assert_array_equal(assembler.result()[("w", "")], gradient)


def test_the_assembler_reads_each_payload_once():
    class CountingChunk:
        def __init__(self, chunk):
            self._chunk, self.reads = chunk, 0

        def __getattr__(self, name):
            if name == "data":
                self.reads += 1
            return getattr(self._chunk, name)

    chunks = [CountingChunk(c) for c in tensors.encode("w", np.arange(1000, dtype=np.float32), chunk_bytes=1024)]
    tensors.decode_all(chunks)
    assert [c.reads for c in chunks] == [1] * 4


def test_assembled_arrays_do_not_share_memory_with_the_received_bytes():
    (raw,) = tensors.serialized_chunk_messages(_first(), "variables", [("w", "", np.ones(100_000, np.float32))])
    _, chunks = tensors.split_message(raw, pb.PullResponse, "variables")
    value = tensors.decode_all(chunks)[("w", "")]
    value[:] = 7
    assert pb.PullResponse.FromString(raw).variables[0].data == np.ones(100_000, np.float32).tobytes()
