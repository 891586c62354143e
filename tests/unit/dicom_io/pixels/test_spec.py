"""dicom_io.pixels.spec: InputSpec refuses a model card's bad input description, naming the value."""

from __future__ import annotations

import pytest

from dicom_io.pixels import InputSpec


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"rows": 0, "columns": 224}, "rows"),
        ({"rows": 224, "columns": -3}, "columns"),
        ({"rows": 224, "columns": 224, "channels": 2}, "channels"),
        ({"rows": 224, "columns": 224, "aspect": "crop"}, "crop"),
        ({"rows": 224, "columns": 224, "windowing": "auto"}, "auto"),
        ({"rows": 224, "columns": 224, "percentiles": (99.0, 1.0)}, "percentiles"),
        ({"rows": 224, "columns": 224, "percentiles": (-1.0, 50.0)}, "percentiles"),
    ],
)
def test_input_spec_validation(kwargs, text):
    with pytest.raises(ValueError, match=text):
        InputSpec(**kwargs)
