"""What a GGUF model will take in memory, from its header alone (read with the ``gguf`` package).

Weights are the tensors' own bytes (already quantized: a GGUF is loaded as it lies on disk).
The KV cache is two f16 tensors per layer of ``n_ctx x n_head_kv x head_dim``. llama.cpp's
compute buffer is reserved for a batch of ``min(n_batch, n_ctx)`` tokens, and its graph
allocator reuses memory between steps, so it is about the larger of the batch's logits and its
attention scores and mask against the whole context, plus the feed-forward activations; the CPU
backend's work buffer adds the scores converted to f16. The constants were fitted against
llama.cpp's own "compute buffer size" log lines and measured peak RSS with a prompt that fills
the context (within a few percent for models whose weights are more than a few MiB).
"""

from __future__ import annotations

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
    kv = 2 * n_layer * n_ctx * n_head_kv * head_dim * KV_ELEMENT_BYTES
    batch = min(options.n_batch, n_ctx)
    n_ff = header.get("feed_forward_length") or 4 * n_embd
    scores = max(FLOAT_BYTES * header["vocab_size"], n_ctx * (FLOAT_BYTES * n_head + 6))
    compute = batch * (scores + 6 * n_ff + 2 * n_head * n_ctx)
    return int(header["tensor_bytes"] + kv + compute)


def read_header(path: Path) -> dict[str, Any]:
    """The sizes an estimate needs: the architecture's hyper-parameters and the tensor bytes."""
    try:
        from gguf import GGUFReader  # here: the daemon maps it only when it serves a GGUF model
    except ImportError:
        raise ModelLoadError(
            "GGUF models need the gguf package: pip install 'edged[gguf]'"
        ) from None

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError) as exc:  # bad magic, truncated, garbled
        raise ValueError(f"not a readable GGUF file: {exc}") from None
    fields = reader.fields

    def value(key: str) -> Any:
        field = fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
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
        found = value(f"{arch}.{key}")
        header[key.removeprefix("attention.")] = int(found) if isinstance(found, int) else None
    for key in ("block_count", "embedding_length", "head_count"):
        if not header[key]:
            raise ValueError(f"{arch}.{key} is missing from the GGUF header")
    tokens = fields.get("tokenizer.ggml.tokens")
    header["vocab_size"] = len(tokens.data) if tokens is not None else 0
    header["tensor_bytes"] = sum(int(tensor.n_bytes) for tensor in reader.tensors)
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise ValueError(f"truncated: tensor data ends at byte {end}, the file has fewer")
    return header
