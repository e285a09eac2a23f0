"""Writes checkpoints in format version 1 (``arrays.bin``), as optserve wrote them before version 2,
so tests can check that such checkpoints still restore."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time

import numpy as np

from optserve.server.checkpoint import _encode_tree, _write_manifest

_ALIGNMENT = 64


def write_v1_checkpoint(directory: pathlib.Path, sequence: int, state) -> pathlib.Path:
    """``directory/ckpt-<sequence>`` holding ``state`` in format version 1."""
    tree, _, arrays = _encode_tree(state)
    path = directory / f"ckpt-{sequence:08d}"
    path.mkdir(parents=True)
    index, offset = [], 0
    with open(path / "arrays.bin", "wb") as handle:
        for array in arrays:
            padding = -offset % _ALIGNMENT
            handle.write(b"\0" * padding)
            offset += padding
            raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8).tobytes()
            handle.write(raw)
            index.append(
                {
                    "dtype": array.dtype.str,
                    "shape": list(array.shape),
                    "offset": offset,
                    "nbytes": len(raw),
                    "sha256": hashlib.sha256(raw).hexdigest(),
                }
            )
            offset += len(raw)
    body = {
        "format": "optserve-checkpoint",
        "version": 1,
        "sequence": sequence,
        "saved_at": time.time(),
        "data_file": "arrays.bin",
        "data_bytes": offset,
        "arrays": index,
        "tree": tree,
    }
    _write_manifest(path / "manifest.json", body)
    assert json.loads((path / "manifest.json").read_text())["version"] == 1
    os.sync()
    return path
