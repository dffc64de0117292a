"""OpenAI request bodies to the daemon's requests (``Generate``, ``Chat``, ``Embed``).

Every field is either mapped, accepted and ignored (it changes nothing here), accepted only at
the value that asks for nothing (``n: 1``), or refused: a client that asks for what edged does
not do hears so, rather than getting something else. A ``null`` is the field's default, as in
OpenAI's API. Values are checked by the requests themselves, whose messages name the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from edged.errors import BadRequest
from edged.models.calls import MAX_TOP_LOGPROBS, Chat, Embed, Generate, Sampling
from edged.protocol import is_int

#: OpenAI's names of the daemon's sampling settings, and llama.cpp's extras, taken as they are
SAMPLING_FIELDS = frozenset(
    {
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "top_k",
        "min_p",
        "repeat_penalty",
        "grammar",
    }
)
#: fields of every generation: mapped here rather than passed on as they are
TEXT_FIELDS = frozenset({"model", "stream", "stream_options", "response_format"})
COMPLETION_FIELDS = SAMPLING_FIELDS | TEXT_FIELDS | {"prompt", "logprobs"}
CHAT_OWN_FIELDS = frozenset({"messages", "max_completion_tokens", "logprobs", "top_logprobs"})
CHAT_FIELDS = SAMPLING_FIELDS | TEXT_FIELDS | CHAT_OWN_FIELDS
EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format"})
#: accepted and ignored: they ask for nothing edged would do differently
IGNORED_FIELDS = frozenset({"user", "metadata", "service_tier", "parallel_tool_calls"})
#: OpenAI's fields that edged does not do, each accepted at the values that ask for nothing
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "store": (False,),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "web_search_options": (),
    "dimensions": (),
}
UNSUPPORTED_WHY = {
    "n": "edged makes one choice per request",
    "best_of": "edged makes one choice per request",
    "tools": "tool calls are not supported",
    "tool_choice": "tool calls are not supported",
    "functions": "function calls are not supported",
    "function_call": "function calls are not supported",
    "dimensions": "an embedding has the model's own width",
}
ENCODINGS = ("float", "base64")

T = TypeVar("T", Generate, Chat)


@dataclass(frozen=True)
class TextCall(Generic[T]):
    """A ``generate`` or ``chat`` request, and how its answer is to be sent."""

    request: T
    stream: bool
    #: send a last chunk with the usage (``stream_options.include_usage``)
    include_usage: bool


@dataclass(frozen=True)
class EmbedCall:
    request: Embed
    #: the vectors as base64 of little-endian float32, not as arrays of numbers
    base64: bool


def completion(body: Mapping[str, Any], request_id: int, trace: str) -> TextCall[Generate]:
    """``/v1/completions``: a prompt to continue; ``logprobs`` is the number of alternatives."""
    given = _given(body, COMPLETION_FIELDS)
    prompt = given.pop("prompt", None)
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise BadRequest("'prompt' takes one string here (a list of exactly one is fine)")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be a string (token ids are not supported)")
    top = given.pop("logprobs", None)
    if top is not None:
        if not (is_int(top) and 0 <= top <= MAX_TOP_LOGPROBS):
            raise BadRequest(
                f"'logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}: how many likeliest "
                f"alternatives to send with each token's log-probability"
            )
        given.update(logprobs=True, top_logprobs=top)
    request = Generate(
        id=request_id,
        op="generate",
        trace=trace,
        model=_model(given),
        prompt=prompt,
        sampling=_sampling(given),
    )
    return _text_call(request, given)


def chat(body: Mapping[str, Any], request_id: int, trace: str) -> TextCall[Chat]:
    """``/v1/chat/completions``: messages, answered by the model's chat template."""
    given = _given(body, CHAT_FIELDS)
    newer = given.pop("max_completion_tokens", None)
    if newer is not None:
        if given.get("max_tokens", newer) != newer:
            raise BadRequest("give 'max_completion_tokens' or 'max_tokens', not both")
        given["max_tokens"] = newer
    messages = given.pop("messages", None)
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be an array of messages")
    request = Chat(
        id=request_id,
        op="chat",
        trace=trace,
        model=_model(given),
        messages=tuple(messages),
        sampling=_sampling(given),
    )
    return _text_call(request, given)


def embedding(body: Mapping[str, Any], request_id: int, trace: str) -> EmbedCall:
    """``/v1/embeddings``: one text or a list of them."""
    given = _given(body, EMBEDDING_FIELDS)
    encoding = given.pop("encoding_format", "float")
    if encoding not in ENCODINGS:
        raise BadRequest(f"'encoding_format' must be one of {', '.join(ENCODINGS)}")
    texts = given.pop("input", None)
    if not isinstance(texts, (str, list)) or (
        isinstance(texts, list) and not all(isinstance(text, str) for text in texts)
    ):
        raise BadRequest("'input' must be a string or an array of strings (not token ids)")
    texts = (texts,) if isinstance(texts, str) else tuple(texts)
    request = Embed(id=request_id, op="embed", trace=trace, model=_model(given), texts=texts)
    return EmbedCall(request, base64=encoding == "base64")


def _given(body: Mapping[str, Any], fields: frozenset[str]) -> dict[str, Any]:
    """The body's mapped fields that are not null, after refusing the rest."""
    for key, value in body.items():
        if key in fields or key in IGNORED_FIELDS or value is None:
            continue
        if key not in NEUTRAL_VALUES:
            raise BadRequest(f"'{key}' is not a field this endpoint knows")
        if value not in NEUTRAL_VALUES[key]:
            why = UNSUPPORTED_WHY.get(key, "it is not supported")
            raise BadRequest(f"'{key}' cannot be {value!r}: {why}")
    return {key: value for key, value in body.items() if key in fields and value is not None}


def _model(given: dict[str, Any]) -> str:
    model = given.pop("model", None)
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must name a model (GET /v1/models lists them)")
    return model


def _sampling(given: dict[str, Any]) -> Sampling:
    """The sampling settings among ``given`` (removed from it), checked by ``Sampling``."""
    options = {key: given.pop(key) for key in SAMPLING_FIELDS & given.keys()}
    for key in ("logprobs", "top_logprobs"):
        if key in given:
            options[key] = given.pop(key)
    schema = _json_schema(given.pop("response_format", None))
    if schema is not None:
        options["json_schema"] = schema
    return Sampling(**options)


def _json_schema(response_format: Any) -> Mapping[str, Any] | None:
    """The JSON schema ``response_format`` asks the output to follow, if any."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise BadRequest("'response_format.json_schema' must be an object with a 'schema'")
        schema = spec.get("schema", {})
        if not isinstance(schema, Mapping):
            raise BadRequest("'response_format.json_schema.schema' must be a JSON schema object")
        return schema
    raise BadRequest(
        '\'response_format\' must be {"type": "text"}, {"type": "json_object"} or '
        '{"type": "json_schema", "json_schema": {"schema": ...}}'
    )


def _text_call(request: T, given: dict[str, Any]) -> TextCall[T]:
    stream = given.pop("stream", False)
    if type(stream) is not bool:
        raise BadRequest("'stream' must be a boolean")
    options = given.pop("stream_options", {})
    if not isinstance(options, Mapping) or not set(options) <= {"include_usage"}:
        raise BadRequest("'stream_options' takes only 'include_usage'")
    include_usage = options.get("include_usage", False)
    if type(include_usage) is not bool:
        raise BadRequest("'stream_options.include_usage' must be a boolean")
    return TextCall(request, stream, include_usage)
