"""How many bytes of weights an ONNX model holds, read from its files alone.

Weights live in the model file (as initializers, or as Constant nodes, as many exporters write
them) or in external data files that initializers point to. So the count is the file's size plus
the external data it references. Finding those references takes a small protobuf walk rather
than ``onnx.load``: importing ``onnx`` adds ~10 MB to the daemon's resident memory for good,
which is what the budget this number feeds is meant to protect. Only the fields on the path are
read: ModelProto.graph -> GraphProto.initializer -> TensorProto.external_data. The file is
mapped, not read: the walk touches only those fields' pages, so a 190 MB model costs a few
pages rather than 190 MB of memory at every load.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

# field numbers from onnx.proto
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def weight_bytes(path: Path) -> int:
    """The model file's size plus every external data byte its initializers reference."""
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            return 0
        # not closed here: views of it may outlive this call in an exception's traceback; it
        # is unmapped when the last of them goes
        data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    total = size
    for field, graph in _fields(memoryview(data)):
        if field != _MODEL_GRAPH:
            continue
        for graph_field, tensor in _fields(graph):
            if graph_field == _GRAPH_INITIALIZER:
                total += _external_length(tensor, path.parent)
    return total


def _external_length(tensor: memoryview, directory: Path) -> int:
    """The size of an initializer stored outside the model file (0 when it is inside)."""
    entries = {}
    for field, entry in _fields(tensor):
        if field == _TENSOR_EXTERNAL_DATA:
            pair = dict(_fields(entry))
            if _ENTRY_KEY in pair and _ENTRY_VALUE in pair:
                entries[bytes(pair[_ENTRY_KEY]).decode()] = bytes(pair[_ENTRY_VALUE]).decode()
    if "length" in entries:
        return int(entries["length"])
    location = entries.get("location")
    if location is None:
        return 0
    external = directory / location
    return external.stat().st_size if external.is_file() else 0


def _fields(message: memoryview) -> list[tuple[int, memoryview]]:
    """The length-delimited fields of a message, as (field number, payload); others skipped."""
    found = []
    pos, end = 0, len(message)
    while pos < end:
        key, pos = _varint(message, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, pos = _varint(message, pos)
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        elif wire == _LEN:
            length, pos = _varint(message, pos)
            found.append((field, message[pos : pos + length]))
            pos += length
        else:
            raise ValueError(f"not an ONNX model: protobuf wire type {wire} at byte {pos}")
    if pos != end:
        raise ValueError("not an ONNX model: truncated protobuf")
    return found


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("not an ONNX model: truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
