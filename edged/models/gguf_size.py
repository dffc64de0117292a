"""What a GGUF model will take in memory, from its header alone (read with the ``gguf`` package).

Weights are the tensors' own bytes (already quantized: a GGUF is loaded as it lies on disk).
The KV cache is two f16 tensors per layer of ``n_ctx x n_head_kv x head_dim``, for each of the
``parallel`` sequences. llama.cpp's
compute buffer is reserved for a batch of ``min(n_batch, n_ctx)`` tokens, and its graph
allocator reuses memory between steps, so it is about the larger of the batch's logits and its
attention scores and mask against the whole context, plus the feed-forward activations; the CPU
backend's work buffer adds the scores converted to f16. The constants were fitted against
llama.cpp's own "compute buffer size" log lines and measured peak RSS with a prompt that fills
the context (within a few percent for models whose weights are more than a few MiB).
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any

from edged.config import GgufOptions
from edged.errors import ModelLoadError

KV_ELEMENT_BYTES = 2
FLOAT_BYTES = 4
#: llama.cpp pads the context it allocates to a multiple of this many tokens
N_CTX_PAD = 256


def estimate_bytes(path: Path, options: GgufOptions) -> int:
    """Weights + KV cache + compute buffers; raises ValueError for a file that is not GGUF."""
    header = read_header(path)
    n_layer, n_embd = header["block_count"], header["embedding_length"]
    n_head = header["head_count"]
    n_head_kv = header.get("head_count_kv") or n_head
    head_dim = header.get("key_length") or n_embd // n_head
    n_ctx = -(-options.n_ctx // N_CTX_PAD) * N_CTX_PAD
    kv = 2 * n_layer * n_ctx * n_head_kv * head_dim * KV_ELEMENT_BYTES * options.parallel
    batch = min(max(options.n_batch, options.parallel), n_ctx)
    n_ff = header.get("feed_forward_length") or 4 * n_embd
    scores = max(FLOAT_BYTES * header["vocab_size"], n_ctx * (FLOAT_BYTES * n_head + 6))
    compute = batch * (scores + 6 * n_ff + 2 * n_head * n_ctx)
    return int(header["tensor_bytes"] + kv + compute)


def read_header(path: Path) -> dict[str, Any]:
    """The sizes an estimate needs: the architecture's hyper-parameters and the tensor bytes."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise ModelLoadError("GGUF models need 'gguf': pip install 'edged[gguf]'") from None
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            fields, tensors, data_start = _walk(data)
    except (ValueError, struct.error, OverflowError) as exc:  # bad magic, truncated, garbled
        raise ValueError(f"not a readable GGUF file: {exc}") from None
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError("not a GGUF model: general.architecture is missing")
    header: dict[str, Any] = {"architecture": arch}
    for key in (
        "block_count",
        "embedding_length",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "context_length",
    ):
        found = fields.get(f"{arch}.{key}")
        header[key.removeprefix("attention.")] = found if isinstance(found, int) else None
    for key in ("block_count", "embedding_length", "head_count"):
        if not header[key]:
            raise ValueError(f"{arch}.{key} is missing from the GGUF header")
    header["vocab_size"] = fields.get("tokenizer.ggml.tokens", 0)
    total, end = 0, data_start
    for elements, kind, offset in tensors:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise ValueError(f"not a readable GGUF file: unknown tensor type {kind}") from None
        size = elements // block * block_bytes
        total += size
        end = max(end, data_start + offset + size)
    if end > path.stat().st_size:
        raise ValueError(f"truncated: tensor data ends at byte {end}, the file has fewer")
    header["tensor_bytes"] = total
    return header


# A hand-written walk of the GGUF layout rather than gguf.GGUFReader: the reader builds a numpy
# view per array item, which takes seconds on a real vocabulary (2.4 s for 32k tokens, 8.9 s
# for 128k measured) on every cold load. This reads the scalar keys and skips arrays, keeping
# only their length. Layout: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_SCALARS.update({11: "<q", 12: "<d"})
_STRING, _ARRAY = 8, 9
_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32


def _walk(data: mmap.mmap) -> tuple[dict[str, Any], list[tuple[int, int, int]], int]:
    """Keys (arrays as their length), tensors as (elements, type, offset), data start."""
    if data[:4] != _MAGIC:
        raise ValueError("bad magic: not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    pos = 24
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = _string(data, pos)
        (kind,) = struct.unpack_from("<I", data, pos)
        fields[key], pos = _value(data, pos + 4, kind)
    tensors = []
    for _ in range(n_tensors):
        _, pos = _string(data, pos)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
        kind, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        tensors.append((math.prod(dims), kind, offset))
    alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"bad general.alignment {alignment!r}")
    return fields, tensors, -(-pos // alignment) * alignment


def _string(data: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, pos)
    end = pos + 8 + length
    if end > len(data):
        raise ValueError("a string runs past the end of the file")
    return data[pos + 8 : end].decode("utf-8", "replace"), end


def _value(data: mmap.mmap, pos: int, kind: int) -> tuple[Any, int]:
    """One value at ``pos`` and the position after it; an array is given as its length."""
    if kind == _STRING:
        return _string(data, pos)
    if kind == _ARRAY:
        item, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if item in _SCALARS:
            return count, pos + count * struct.calcsize(_SCALARS[item])
        for _ in range(count):
            _, pos = _value(data, pos, item)
        return count, pos
    scalar = _SCALARS.get(kind)
    if scalar is None:
        raise ValueError(f"unknown value type {kind}")
    (value,) = struct.unpack_from(scalar, data, pos)
    return value, pos + struct.calcsize(scalar)
