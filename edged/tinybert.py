"""A tiny but real BERT-style text encoder built from code: an ONNX graph and its WordPiece
``tokenizer.json``, for tests and benchmarks of ``embed`` on ONNX models.

The tokenizer is made with the ``tokenizers`` library exactly as a BERT checkpoint's is
(BERT normalizer: lower case, accents stripped, Chinese characters split; WordPiece with
``##`` continuations; ``[CLS] text [SEP]``), over a fixed word list and single characters. The
graph is transformer layers (one by default) with seeded random weights: token, position and segment
embeddings, masked self-attention, a feed-forward block, layer norms; its output is every
token's state, ``last_hidden_state`` float32[texts, tokens, HIDDEN], which ``embed`` pools.
Nothing is downloaded. ``onnx``, ``tokenizers`` and ``numpy`` are imported only when one is
built.

``python -m edged.tinybert OUT.onnx`` writes one (and ``OUT.tokenizer.json`` beside it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HIDDEN = 32
#: the longest text the position table covers; the tokenizer truncates to it by default
MAX_POSITIONS = 128
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_WORDS = (
    "the of and to in is it that was for on are as with he she they be at by this have from"
    " or one had not but what all were when we there can an your which their said if do will"
    " hello world cat dog sun moon tree house red blue green edge model token camera sensor"
    " part face machine fault normal motor heat cold fast slow"
)
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-éü北京"


def build_vocab() -> dict[str, int]:
    """WordPiece vocabulary: specials, whole words, then each character alone and as ``##``."""
    pieces = [*SPECIALS, *_WORDS.split(), *_CHARS, *(f"##{c}" for c in _CHARS)]
    return {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}


def build_tokenizer(path: Path) -> Path:
    """A BERT-style ``tokenizer.json`` at ``path``."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = build_vocab()
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.enable_truncation(MAX_POSITIONS)
    tokenizer.enable_padding(pad_id=vocab["[PAD]"], pad_token="[PAD]")
    tokenizer.save(str(path))
    return path


def build_tiny_bert(path: Path, seed: int = 0, hidden: int = HIDDEN, layers: int = 1) -> Path:
    """The encoder at ``path`` and its tokenizer at ``<stem>.tokenizer.json`` beside it;
    ``hidden`` 384 and ``layers`` 6 make one of MiniLM-L6's size and cost."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    vocab = len(build_vocab())

    def weight(name: str, *shape: int, scale: float = 0.2) -> Any:
        scale = min(scale, 1 / np.sqrt(shape[0])) if len(shape) == 2 and shape[0] > 2 else scale
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name
        )

    def const(name: str, value: Any) -> Any:
        return numpy_helper.from_array(np.asarray(value), name)

    initializers = [
        weight("word", vocab, hidden, scale=1.0),
        weight("position", MAX_POSITIONS, hidden, scale=0.5),
        weight("segment", 2, hidden, scale=0.5),
        const("gamma", np.ones(hidden, np.float32)),
        const("beta", np.zeros(hidden, np.float32)),
        const("zero", np.int64(0)),
        const("one", np.int64(1)),
        const("one_f", np.float32(1.0)),
        const("axis1", np.asarray([1], np.int64)),
        const("neg", np.float32(-1e4)),
        const("scale", np.float32(1 / np.sqrt(hidden))),
    ]
    node = helper.make_node
    nodes = [
        # embeddings: word + position + segment, normalised
        node("Gather", ["word", "input_ids"], ["e_word"]),
        node("Shape", ["input_ids"], ["shape"]),
        node("Gather", ["shape", "one"], ["length"]),
        node("Range", ["zero", "length", "one"], ["positions"]),
        node("Gather", ["position", "positions"], ["e_pos"]),
        node("Gather", ["segment", "token_type_ids"], ["e_seg"]),
        node("Add", ["e_word", "e_pos"], ["e_sum0"]),
        node("Add", ["e_sum0", "e_seg"], ["e_sum"]),
        node("LayerNormalization", ["e_sum", "gamma", "beta"], ["x0"], axis=-1),
        # padding gets -1e4 before every softmax
        node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        node("Sub", ["one_f", "mask_f"], ["masked"]),
        node("Mul", ["masked", "neg"], ["bias0"]),
        node("Unsqueeze", ["bias0", "axis1"], ["bias"]),
    ]
    for layer in range(layers):
        x, n = f"x{layer}", f"l{layer}_"
        last = layer == layers - 1
        initializers += [weight(n + w, hidden, hidden) for w in ("wq", "wk", "wv", "wo")]
        initializers += [weight(n + "w1", hidden, 4 * hidden), weight(n + "w2", 4 * hidden, hidden)]
        nodes += [
            # masked self-attention
            node("MatMul", [x, n + "wq"], [n + "q"]),
            node("MatMul", [x, n + "wk"], [n + "k"]),
            node("MatMul", [x, n + "wv"], [n + "v"]),
            node("Transpose", [n + "k"], [n + "kt"], perm=[0, 2, 1]),
            node("MatMul", [n + "q", n + "kt"], [n + "scores0"]),
            node("Mul", [n + "scores0", "scale"], [n + "scores1"]),
            node("Add", [n + "scores1", "bias"], [n + "scores"]),
            node("Softmax", [n + "scores"], [n + "weights"], axis=-1),
            node("MatMul", [n + "weights", n + "v"], [n + "context"]),
            node("MatMul", [n + "context", n + "wo"], [n + "attended"]),
            node("Add", [x, n + "attended"], [n + "h0"]),
            node("LayerNormalization", [n + "h0", "gamma", "beta"], [n + "h"], axis=-1),
            # feed-forward block
            node("MatMul", [n + "h", n + "w1"], [n + "f0"]),
            node("Relu", [n + "f0"], [n + "f1"]),
            node("MatMul", [n + "f1", n + "w2"], [n + "f2"]),
            node("Add", [n + "h", n + "f2"], [n + "out0"]),
            node(
                "LayerNormalization",
                [n + "out0", "gamma", "beta"],
                ["last_hidden_state" if last else f"x{layer + 1}"],
                axis=-1,
            ),
        ]
    tokens = ["texts", "tokens"]
    graph = helper.make_graph(
        nodes,
        "edged-tiny-bert",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, tokens)
            for name in ("input_ids", "attention_mask", "token_type_ids")
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*tokens, hidden])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # onnxruntime builds for Python 3.10 read IR 8 at most
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    build_tokenizer(path.with_suffix(".tokenizer.json"))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edged.tinybert", description=__doc__)
    parser.add_argument("out", type=Path, help="where to write the .onnx file")
    args = parser.parse_args(argv)
    path = build_tiny_bert(args.out)
    print(f'[models.encoder]\npath = "{path}"\nembed = {{ pooling = "mean" }}')
    return 0


if __name__ == "__main__":
    sys.exit(main())
