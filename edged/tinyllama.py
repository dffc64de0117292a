"""A tiny but real llama-architecture GGUF model built from code, for tests and benchmarks.

The gguf backend needs a model that llama.cpp really loads, tokenizes with, generates and
embeds with, yet nothing may be downloaded. So the weights are seeded random normals and the
SentencePiece-style vocabulary (a few hundred pieces: control tokens, the 256 byte-fallback
tokens, a fixed word list and single characters) is built here. Output is gibberish, but
deterministic, and the model never emits EOS or other special/byte tokens, so a generation runs
to exactly ``max_tokens`` tokens of valid text. It carries a small chat template
(``CHAT_TEMPLATE``), so that ``chat`` can be served too. ``gguf``, ``llama_cpp`` and ``numpy``
are imported only when a model is built: this module lives in the daemon package.

``python -m edged.tinyllama OUT.gguf`` writes one, to try edged's language-model side with no
download (it needs the ``gguf`` extra).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import numpy as np

    Array = np.ndarray[Any, Any]

QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_K_M")

_WORDS = (
    "the of and to in is it that was for on are as with he she they be at by this have from"
    " or one had not but what all were when we there can an your which their said if do will"
    " each about how up out them then many some so these would other into has more her two"
    " like him see time could no make than first been its who now people my made over did"
    " down only way find use may water long little very after words called just where most"
    " know hello world cat dog sun moon tree house red blue green edge model token"
)
_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
)
_SPACE = "\u2581"  # SentencePiece's word-boundary marker
_UNK, _BOS, _EOS = 0, 1, 2
_BIAS_DIM = 0  # a residual channel held constant, so the EOS logit can be pinned far below

#: "role: content" lines, then "assistant:" for the turn to come (plain text: no special tokens
#: to add to the vocabulary); a role it was not written for is refused, as real templates do
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message.role not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('the tiny chat template has no role ' ~ message.role) }}"
    "{% endif %}"
    "{{ message.role }}: {{ message.content }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class _Dims(NamedTuple):
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ctx: int
    seed: int


def build_vocab() -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and token types (gguf.TokenType values) of the built-in vocabulary."""
    normal, unknown, control, byte = 1, 2, 3, 6
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [unknown, control, control] + [byte] * 256
    # SPM tokenizing merges adjacent pieces only into pieces in the vocabulary, so every prefix
    # of "▁word" is a piece too; higher scores merge first, so longer pieces score higher.
    pieces = {_SPACE, *_CHARS, *(_SPACE + c for c in _CHARS[:26])}
    for word in _WORDS.split():
        pieces.update(_SPACE + word[:i] for i in range(1, len(word) + 1))
    ordered = sorted(pieces, key=lambda p: (-len(p), p))
    tokens += ordered
    types += [normal] * len(ordered)
    scores = [0.0] * 259 + [-float(i) for i in range(len(ordered))]
    return tokens, scores, types


def build_tiny_llama(
    path: Path,
    *,
    n_embd: int = 256,
    n_ff: int = 512,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_ctx_train: int = 2048,
    seed: int = 0,
    quantize: str | None = None,
    chat_template: str | None = CHAT_TEMPLATE,
) -> Path:
    """Write the model to ``path`` (atomically) and return it.

    ``quantize`` is None (F16 matrices, F32 norms) or one of QUANT_TYPES. Quantizing needs
    ``n_embd`` and ``n_ff`` divisible by 32, or llama.cpp silently keeps F16 (raised here as
    RuntimeError); Q4_K_M wants 256, else it falls back to Q5_0/Q8_0 per tensor.
    ``chat_template`` None writes a model without one (which serves no ``chat``).
    """
    n_head_kv = n_head if n_head_kv is None else n_head_kv
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head and n_head by n_head_kv")
    if quantize is not None and quantize not in QUANT_TYPES:
        raise ValueError(f"quantize must be one of {QUANT_TYPES}, not {quantize!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tinyllama-") as tmp:
        f16_path = Path(tmp) / "f16.gguf"
        dims = _Dims(n_embd, n_ff, n_layer, n_head, n_head_kv, n_ctx_train, seed)
        _write_f16(f16_path, dims, chat_template)
        out = f16_path
        if quantize is not None:
            out = Path(tmp) / "quant.gguf"
            _quantize(f16_path, out, quantize)
            f16_path.unlink()
        with out.open("rb") as fh:
            os.fsync(fh.fileno())
        out.replace(path)
    return path


def _write_f16(path: Path, d: _Dims, chat_template: str | None) -> None:
    import gguf

    tokens, scores, types = build_vocab()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"edged-tiny-llama-{d.n_embd}x{d.n_layer}-s{d.seed}")
    writer.add_context_length(d.n_ctx)
    writer.add_embedding_length(d.n_embd)
    writer.add_block_count(d.n_layer)
    writer.add_feed_forward_length(d.n_ff)
    writer.add_rope_dimension_count(d.n_embd // d.n_head)
    writer.add_head_count(d.n_head)
    writer.add_head_count_kv(d.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(_BOS)
    writer.add_eos_token_id(_EOS)
    writer.add_unk_token_id(_UNK)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for name, array in _weights(d, types):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _weights(d: _Dims, types: list[int]) -> list[tuple[str, Array]]:
    """Named tensors, matrices as (out, in) like a torch Linear: the writer reverses dims."""
    import numpy as np

    rng = np.random.default_rng(d.seed)
    n_vocab, n_embd, n_ff = len(types), d.n_embd, d.n_ff
    n_embd_kv = d.n_head_kv * (n_embd // d.n_head)

    def mat(rows: int, cols: int, scale: float) -> Array:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float16)

    def norm() -> Array:
        return np.ones(n_embd, dtype=np.float32)

    # Channel _BIAS_DIM of the residual stream is 1.0 for every token and no layer writes to it,
    # so after the final RMS norm it is always positive: a bias the output layer can use.
    embd = mat(n_vocab, n_embd, 0.1)
    embd[:, _BIAS_DIM] = 1.0
    output = mat(n_vocab, n_embd, 0.1)
    output[:, _BIAS_DIM] = 0.0
    special = np.array(types) != 1  # unk, bos, eos, byte tokens: never emitted
    output[special] = 0.0
    output[special, _BIAS_DIM] = -16.0
    tensors: list[tuple[str, Array]] = [("token_embd.weight", embd)]
    for i in range(d.n_layer):
        attn_out, ffn_down = mat(n_embd, n_embd, 0.02), mat(n_embd, n_ff, 0.02)
        attn_out[_BIAS_DIM] = ffn_down[_BIAS_DIM] = 0.0
        tensors += [
            (f"blk.{i}.attn_norm.weight", norm()),
            (f"blk.{i}.attn_q.weight", mat(n_embd, n_embd, 0.05)),
            (f"blk.{i}.attn_k.weight", mat(n_embd_kv, n_embd, 0.05)),
            (f"blk.{i}.attn_v.weight", mat(n_embd_kv, n_embd, 0.05)),
            (f"blk.{i}.attn_output.weight", attn_out),
            (f"blk.{i}.ffn_norm.weight", norm()),
            (f"blk.{i}.ffn_gate.weight", mat(n_ff, n_embd, 0.05)),
            (f"blk.{i}.ffn_up.weight", mat(n_ff, n_embd, 0.05)),
            (f"blk.{i}.ffn_down.weight", ffn_down),
        ]
    return [*tensors, ("output_norm.weight", norm()), ("output.weight", output)]


def _quantize(src: Path, dst: Path, quantize: str) -> None:
    import ctypes

    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quantize}")
    log = logging.getLogger("llama-cpp-python")  # llama_cpp's C log callback obeys its level
    level = log.level
    log.setLevel(logging.ERROR)  # quantizing logs a line per tensor to stderr otherwise
    try:
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(dst).encode(), ctypes.byref(params)
        )
    finally:
        log.setLevel(level)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {quantize} failed with {rc}")
    float_types = {gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32}
    kept = [
        t.name
        for t in gguf.GGUFReader(dst).tensors
        if len(t.shape) > 1 and t.tensor_type in float_types
    ]
    if kept:
        raise RuntimeError(f"{quantize} left {kept} unquantized: n_embd/n_ff not block-aligned?")


def main(argv: Sequence[str] | None = None) -> int:
    """Write the tiny model where asked and say how to serve it."""
    parser = argparse.ArgumentParser(
        prog="python -m edged.tinyllama",
        description="Write a tiny llama GGUF model (random weights: gibberish, but real) to try "
        "edged's generate, chat and embed ops without downloading a model",
    )
    parser.add_argument("output", type=Path, help="the .gguf file to write")
    parser.add_argument(
        "--quantize", choices=(*QUANT_TYPES, "F16"), default="Q8_0", help="default Q8_0"
    )
    parser.add_argument("--seed", type=int, default=0, help="another seed, other weights")
    args = parser.parse_args(argv)
    quantize = None if args.quantize == "F16" else args.quantize
    try:
        path = build_tiny_llama(args.output, quantize=quantize, seed=args.seed)
    except ImportError as exc:
        print(f"{parser.prog}: {exc.name} is missing: pip install 'edged[gguf]'", file=sys.stderr)
        return 1
    size = path.stat().st_size / 2**20
    print(
        f"wrote {path} ({size:.1f} MiB). Serve it with, in edged.toml:\n\n"
        f'[models.tiny]\npath = "{path.absolute()}"\n\n'
        'then: edged infer tiny --prompt "Hello" --max-tokens 16'
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
