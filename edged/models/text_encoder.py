"""ONNX text encoders: texts to token tensors with the model's own tokenizer, and a run's token
states to one vector per text.

The tokenizer is a Hugging Face ``tokenizer.json`` read by the ``tokenizers`` library (Rust; the
same code that made the model's training data), imported only when such a model loads. Texts of
one request are padded to the longest of them; the attention mask keeps padding out of the
model and out of mean pooling, so a text's vector does not depend on its neighbours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edged.config import EmbedOptions
from edged.errors import BadRequest, ContextOverflow, EdgedError, ModelLoadError
from edged.models.backend import Signature, TensorSpec
from edged.replies import ReplyTo

#: the model inputs a tokenizer fills, by the names BERT-style exports give them
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: when neither the model nor the tokenizer bounds a text
DEFAULT_MAX_LENGTH = 512
Array = np.ndarray[Any, Any]


def tokenizer_path(model_path: str, embed: EmbedOptions) -> Path:
    """The configured tokenizer, else ``<stem>.tokenizer.json`` beside the model (where a
    bundle's goes), else ``tokenizer.json`` there."""
    if embed.tokenizer:
        return Path(embed.tokenizer)
    beside = Path(model_path).with_suffix(".tokenizer.json")
    return beside if beside.is_file() else beside.with_name("tokenizer.json")


def pool(states: Array, mask: Array, pooling: str) -> Array:
    """One vector per text from ``states`` [texts, tokens, dim] and ``mask`` [texts, tokens]
    (padding on the right)."""
    if pooling == "cls":
        first: Array = states[:, 0]
        return first
    if pooling == "last":  # padding is on the right: a text's last token is at its length - 1
        last: Array = states[np.arange(len(states)), mask.sum(axis=1) - 1]
        return last
    weights = mask[..., None].astype(states.dtype)
    mean: Array = (states * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1)
    return mean


def normalized(vectors: Array) -> Array:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    scaled: Array = vectors / np.maximum(norms, np.finfo(vectors.dtype).tiny)
    return scaled


class TextEncoder:
    """A tokenizer matched to an ONNX model's inputs, and how its output is pooled."""

    def __init__(
        self,
        tokenizer: Any,
        inputs: tuple[TensorSpec, ...],
        output: str,
        max_length: int,
        options: EmbedOptions,
    ) -> None:
        self._tokenizer = tokenizer
        self._inputs = inputs
        self.output = output
        self.max_length = max_length
        self._options = options

    @classmethod
    def load(cls, model_path: str, signature: Signature, options: EmbedOptions) -> TextEncoder:
        """Read the tokenizer and check the model takes what it gives (blocking)."""
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ModelLoadError(
                "text encoders need tokenizers: pip install 'edged[text]'"
            ) from None
        unknown = [spec.name for spec in signature.inputs if spec.name not in TOKEN_INPUTS]
        if unknown or "input_ids" not in {spec.name for spec in signature.inputs}:
            takes = ", ".join(str(spec) for spec in signature.inputs)
            raise ModelLoadError(
                f"a text encoder takes input_ids (and attention_mask, token_type_ids); "
                f"this model takes {takes}"
            )
        output = cls._output(signature, options)
        path = tokenizer_path(model_path, options)
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises its own Exception for any bad file
            raise ModelLoadError(f"cannot read the tokenizer {path}: {exc}") from None
        max_length = options.max_length or cls._limit(signature, tokenizer)
        if options.truncate:  # the tokenizer cuts the text and keeps its special tokens
            tokenizer.enable_truncation(max_length)
        else:
            tokenizer.no_truncation()
        # padding on the right, whatever the file says: pooling finds a text's tokens first
        padding = tokenizer.padding or {}
        tokenizer.enable_padding(
            direction="right",
            pad_id=padding.get("pad_id", 0),
            pad_token=padding.get("pad_token", "[PAD]"),
        )
        return cls(tokenizer, signature.inputs, output, max_length, options)

    @staticmethod
    def _output(signature: Signature, options: EmbedOptions) -> str:
        outputs = {spec.name: spec for spec in signature.outputs}
        name = options.output or signature.outputs[0].name
        spec = outputs.get(name)
        if spec is None:
            raise ModelLoadError(
                f"embed.output {name!r} is not an output of the model: {', '.join(outputs)}"
            )
        rank = 2 if options.pooling == "none" else 3
        if len(spec.shape) != rank:
            raise ModelLoadError(
                f"embed.pooling {options.pooling!r} needs an output of rank {rank}; {spec} is not"
            )
        return name

    @staticmethod
    def _limit(signature: Signature, tokenizer: Any) -> int:
        """The model's fixed sequence length, else the tokenizer's truncation limit."""
        fixed = [spec.shape[1] for spec in signature.inputs if len(spec.shape) > 1]
        if fixed and fixed[0] is not None:
            return int(fixed[0])
        truncation = tokenizer.truncation
        return int(truncation["max_length"]) if truncation else DEFAULT_MAX_LENGTH

    def describe(self) -> dict[str, Any]:
        options = self._options
        return {
            "max_length": self.max_length,
            "truncate": options.truncate,
            "pooling": options.pooling,
            "normalize": options.normalize,
            "output": self.output,
        }

    def encode(self, model: str, texts: Sequence[str]) -> tuple[dict[str, Array], Array]:
        """The model's inputs for ``texts``, and the attention mask (which tokens are the
        texts' own, not padding); an over-long text is ``CONTEXT_OVERFLOW`` unless
        ``truncate`` is set."""
        encodings = self._tokenizer.encode_batch(list(texts))
        mask = np.asarray([encoding.attention_mask for encoding in encodings], np.int64)
        lengths = mask.sum(axis=1)
        if not lengths.all():
            raise BadRequest(f"input[{int(lengths.argmin())}] has no tokens")
        if int(lengths.max()) > self.max_length:
            index = int(lengths.argmax())
            raise ContextOverflow(
                f"input[{index}] is {int(lengths[index])} tokens; model {model!r} embeds at "
                f"most {self.max_length} (embed.max_length; embed.truncate cuts longer texts)"
            )
        columns = {
            "input_ids": [encoding.ids for encoding in encodings],
            "attention_mask": mask,
            "token_type_ids": [encoding.type_ids for encoding in encodings],
        }
        inputs = {
            spec.name: np.asarray(columns[spec.name], dtype=spec.dtype) for spec in self._inputs
        }
        return inputs, mask

    def vectors(self, outputs: Mapping[str, Array], mask: Array) -> Array:
        """One float32 vector per text from the run's outputs."""
        found = outputs[self.output]
        pooled = (
            found if self._options.pooling == "none" else pool(found, mask, self._options.pooling)
        )
        vectors = np.ascontiguousarray(pooled, dtype=np.float32)
        return normalized(vectors) if self._options.normalize else vectors


class EmbeddingReply(ReplyTo):
    """An ``embed`` request's reply, for the run made of its texts: the outputs become one
    vector per text, with the tokens read."""

    __slots__ = ("_encoder", "_inner", "_mask")

    def __init__(self, inner: ReplyTo, encoder: TextEncoder, mask: Array) -> None:
        super().__init__(inner._send, inner.request_id, inner.trace)
        self._inner, self._encoder, self._mask = inner, encoder, mask

    def ok(self, fields: dict[str, Any], outputs: Mapping[str, Array] | None = None) -> bool:
        vectors = self._encoder.vectors(outputs or {}, self._mask)
        fields["usage"] = {"prompt_tokens": int(self._mask.sum())}
        return self._inner.ok(fields, {"embedding": vectors})

    def fail(self, error: EdgedError) -> bool:
        return self._inner.fail(error)
