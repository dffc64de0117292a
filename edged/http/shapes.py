"""The daemon's replies in OpenAI's shapes: chat and text completions (whole, or chunk by
chunk as the daemon streams them), embeddings and models.

A chunk is made per partial reply the daemon sends, so a stream's pace is the daemon's own
(``stream_interval_ms``). Token log-probabilities arrive as ``{token, logprob, top_logprobs}``
entries and leave in each endpoint's own format.
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import numpy as np

Fields = dict[str, Any]
#: the daemon's finish reasons that OpenAI's API also has; the rest (a cancellation) read "stop"
FINISH_REASONS = frozenset({"stop", "length"})


def usage(final: Fields) -> Fields:
    counts = final["usage"]
    prompt, completion = counts["prompt_tokens"], counts.get("completion_tokens", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def finish_reason(final: Fields) -> str:
    reason = final.get("finish_reason")
    return reason if reason in FINISH_REASONS else "stop"


class TextShape(ABC):
    """One answer's objects for a text endpoint; ``chunk`` is called in stream order."""

    object = ""
    chunk_object = ""
    id_prefix = ""

    def __init__(self, trace: str, model: str, created: int) -> None:
        self.trace = trace
        self._id = self.id_prefix + trace
        self._created = created
        self._model = model

    def chunk(self, partial: Fields) -> Fields:
        """A chunk for one partial reply."""
        return self._chunk({**self._piece(partial), "finish_reason": None})

    def end_chunk(self, final: Fields) -> Fields:
        return self._chunk({**self._end(), "finish_reason": finish_reason(final)})

    def usage_chunk(self, final: Fields) -> Fields:
        """The last chunk with ``stream_options.include_usage``: no choices, the usage."""
        return {**self._head(self.chunk_object), "choices": [], "usage": usage(final)}

    def body(self, partials: list[Fields], final: Fields) -> Fields:
        """The whole answer, from every partial reply and the final one."""
        choice = {
            "index": 0,
            **self._whole("".join(p["text"] for p in partials)),
            "logprobs": self._logprobs(partials),
            "finish_reason": finish_reason(final),
        }
        return {**self._head(self.object), "choices": [choice], "usage": usage(final)}

    def _head(self, kind: str) -> Fields:
        return {"id": self._id, "object": kind, "created": self._created, "model": self._model}

    def _chunk(self, choice: Fields) -> Fields:
        return {**self._head(self.chunk_object), "choices": [{"index": 0, **choice}]}

    def _logprobs(self, partials: Iterable[Fields]) -> Fields | None:
        entries = [entry for p in partials for entry in p.get("logprobs", ())]
        return self._format_logprobs(entries) if entries else None

    @abstractmethod
    def _piece(self, partial: Fields) -> Fields:
        """The choice's content for one partial reply."""

    @abstractmethod
    def _end(self) -> Fields:
        """The choice's content in the chunk that ends the stream."""

    @abstractmethod
    def _whole(self, text: str) -> Fields:
        """The choice's content in a whole answer."""

    @abstractmethod
    def _format_logprobs(self, entries: list[Fields]) -> Fields:
        """The daemon's log-probability entries in the endpoint's format."""


class ChatShape(TextShape):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, trace: str, model: str, created: int) -> None:
        super().__init__(trace, model, created)
        self._role_sent = False

    def _piece(self, partial: Fields) -> Fields:
        delta: Fields = {"content": partial["text"]}
        if not self._role_sent:  # OpenAI names the role in the first delta only
            self._role_sent = True
            delta = {"role": "assistant", **delta}
        return {"delta": delta, "logprobs": self._logprobs([partial])}

    def _end(self) -> Fields:
        return {"delta": {}, "logprobs": None}

    def _whole(self, text: str) -> Fields:
        return {"message": {"role": "assistant", "content": text}}

    def _format_logprobs(self, entries: list[Fields]) -> Fields:
        return {"content": [_chat_token(entry) for entry in entries]}


def _chat_token(entry: Fields) -> Fields:
    alternatives = entry.get("top_logprobs", ())
    return {
        **_token(entry),
        "top_logprobs": [_token(alternative) for alternative in alternatives],
    }


def _token(entry: Fields) -> Fields:
    token = entry["token"]
    return {"token": token, "logprob": entry["logprob"], "bytes": list(token.encode())}


class CompletionShape(TextShape):
    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, trace: str, model: str, created: int, prompt: str) -> None:
        super().__init__(trace, model, created)
        #: where the next token starts in prompt + completion (OpenAI's ``text_offset``)
        self._offset = len(prompt)

    def _piece(self, partial: Fields) -> Fields:
        return {"text": partial["text"], "logprobs": self._logprobs([partial])}

    def _end(self) -> Fields:
        return {"text": "", "logprobs": None}

    def _whole(self, text: str) -> Fields:
        return {"text": text}

    def _format_logprobs(self, entries: list[Fields]) -> Fields:
        offsets = []
        for entry in entries:
            offsets.append(self._offset)
            self._offset += len(entry["token"])
        return {
            "tokens": [entry["token"] for entry in entries],
            "token_logprobs": [entry["logprob"] for entry in entries],
            "top_logprobs": [
                {alt["token"]: alt["logprob"] for alt in entry.get("top_logprobs", ())}
                for entry in entries
            ],
            "text_offset": offsets,
        }


def embeddings(model: str, vectors: np.ndarray[Any, Any], final: Fields, as_base64: bool) -> Fields:
    """``/v1/embeddings``: one entry per text, as numbers or as base64 of float32."""
    rows = np.asarray(vectors, dtype="<f4")
    data = [
        {"object": "embedding", "index": index, "embedding": _vector(row, as_base64)}
        for index, row in enumerate(rows)
    ]
    tokens = final["usage"]["prompt_tokens"]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _vector(row: np.ndarray[Any, Any], as_base64: bool) -> Any:
    if as_base64:
        return base64.b64encode(row.tobytes()).decode("ascii")
    return row.tolist()


def model_entry(name: str, created: int) -> Fields:
    return {"id": name, "object": "model", "created": created, "owned_by": "edged"}
