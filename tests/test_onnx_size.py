"""Weight bytes of an ONNX model from its files alone, external data included."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from edged.models.onnx_size import weight_bytes
from tests.models import wide_model


def test_embedded_weights_are_counted_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(wide_model(256), path)
    assert 256 * 256 * 4 <= weight_bytes(path) == path.stat().st_size


def test_external_data_is_added(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(
        wide_model(256),
        path,
        save_as_external_data=True,
        location="m.data",
        size_threshold=0,
    )
    assert path.stat().st_size < 1024
    assert weight_bytes(path) == path.stat().st_size + 256 * 256 * 4


def test_constant_node_weights_count_too(silero_model: Path) -> None:
    assert weight_bytes(silero_model) == silero_model.stat().st_size  # no initializers at all


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"\xff\xff\xff")
    with pytest.raises(ValueError, match="not an ONNX model"):
        weight_bytes(path)
