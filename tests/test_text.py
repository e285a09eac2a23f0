"""Error texts are language-neutral: shapes as lists, values as JSON."""

from __future__ import annotations

import numpy as np

from optserve.server import text
from optserve.server.model_spec import make_spec


def test_the_formatting_helpers_write_json():
    assert text.shape((3, 2)) == "[3, 2]" and text.shape(()) == "[]"
    assert text.tensor((3,), np.float32) == "shape [3] float32"
    assert text.value(None) == "null" and text.value(True) == "true"
    assert text.value({"lr": 0.01, "a": [1, 2]}) == '{"a": [1, 2], "lr": 0.01}'
    assert text.value(np.float32(0.5)) == "0.5" and text.value((1, 2)) == "[1, 2]"
    assert text.name("dense/kernel") == '"dense/kernel"'


def test_spec_differences_show_json_values():
    variables = {"w": np.zeros((3, 2), np.float32)}
    mine = make_spec(model_id="m", optimizer_config={"config": {"clipnorm": None, "lr": 0.1}}, variables=variables)
    theirs = make_spec(
        model_id="m",
        optimizer_config={"config": {"clipnorm": 1.0, "lr": 0.1}},
        variables={"w": np.zeros((2, 3), np.float64)},
        num_workers=2,
    )
    found = mine.differences(theirs)
    assert "optimizer config config.clipnorm: existing null, requested 1.0" in found
    assert "num_workers: existing 1, requested 2" in found
    assert "variable 'w': existing shape [3, 2] float32, requested shape [2, 3] float64" in found
