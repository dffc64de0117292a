"""Weight bytes of an ONNX model from its files alone, external data included."""

from __future__ import annotations

import subprocess
import sys
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


#: the size walk in a fresh interpreter: how much its peak resident memory grows (KiB). VmHWM,
#: not ru_maxrss: a child's ru_maxrss starts from its parent's (this test's, which built the model)
PEAK_GROWTH = """
import sys
from pathlib import Path
from edged.models.onnx_size import weight_bytes
def peak():
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1])
before = peak()
weight_bytes(Path(sys.argv[1]))
print(peak() - before)
"""


def test_a_large_model_is_walked_without_reading_it_into_memory(tmp_path: Path) -> None:
    path = tmp_path / "large.onnx"
    onnx.save(wide_model(5120), path)  # 100 MiB of initializer
    size = path.stat().st_size
    done = subprocess.run(
        [sys.executable, "-c", PEAK_GROWTH, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    growth = int(done.stdout) * 1024
    assert growth < size // 10, f"peak RSS grew {growth / 2**20:.1f} MiB for a {size} byte file"
