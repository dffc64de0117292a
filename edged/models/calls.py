"""What the model runners serve: ``infer``, ``generate`` and ``embed`` requests, each checking
itself (see ``protocol.Request``), and the sampling settings a generation runs with."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np

from edged.errors import BadRequest
from edged.protocol import (
    Buffer,
    Limits,
    RegionRef,
    TensorRef,
    decode_described,
    decode_targets,
    decode_tensors,
    given,
    is_int,
    is_number,
)
from edged.requests import InferenceRequest

MAX_STOPS = 16
MAX_STOP_LEN = 256
MAX_EMBED_TEXTS = 64
MAX_SEED = 2**32 - 1
MAX_TOKENS = 2**31 - 1
#: more than any vocabulary: keeps the value a plain int for llama.cpp
MAX_TOP_K = 1_000_000
MAX_PENALTY = 10.0
MAX_TOP_LOGPROBS = 20
MAX_GRAMMAR_CHARS = 65536
MAX_MESSAGES = 1024
#: the roles a chat template is written for (OpenAI's "developer" is its new name for system)
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

C = TypeVar("C", bound="InferenceRequest")


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How a generation picks and ends its tokens (llama-cpp-python's defaults, except
    ``max_tokens``); the header keys are these fields' names."""

    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    temperature: float = 0.8
    top_p: float = 0.95
    #: the k most likely tokens are kept before sampling; 0 keeps them all
    top_k: int = 40
    #: tokens less likely than this share of the most likely one's probability are dropped
    min_p: float = 0.05
    #: the likelihood of a token seen in the last 64 is divided by this (1 is none)
    repeat_penalty: float = 1.0
    #: subtracted once from a logit of a token among the last 64 (OpenAI's presence_penalty)
    presence_penalty: float = 0.0
    #: subtracted per time a token is among the last 64 (OpenAI's frequency_penalty)
    frequency_penalty: float = 0.0
    seed: int | None = None
    #: a GBNF grammar the output must follow (llama.cpp's grammar format)
    grammar: str | None = None
    #: a JSON schema the output must follow, turned into a grammar; {} is any JSON value
    json_schema: Mapping[str, Any] | None = None
    #: send each token's log-probability (and ``top_logprobs`` alternatives) with its text
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        self._check_sampling()
        self._check_output_control()

    def _check_sampling(self) -> None:
        if not is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_TOKENS:
            raise BadRequest(f"'max_tokens' must be an integer from 1 to {MAX_TOKENS}")
        stop: Any = self.stop
        if isinstance(stop, str):
            stop = [stop]
        if (
            not isinstance(stop, (list, tuple))
            or len(stop) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LEN for s in stop)
        ):
            raise BadRequest(
                f"'stop' must be a string or an array of at most {MAX_STOPS} non-empty strings "
                f"of at most {MAX_STOP_LEN} characters"
            )
        if not (is_number(self.temperature) and 0 <= self.temperature <= 100):
            raise BadRequest("'temperature' must be a number from 0 to 100 (0 is greedy)")
        if not (is_number(self.top_p) and 0 < self.top_p <= 1):
            raise BadRequest("'top_p' must be a number above 0 and at most 1")
        if not (is_int(self.top_k) and 0 <= self.top_k <= MAX_TOP_K):
            raise BadRequest(f"'top_k' must be an integer from 0 to {MAX_TOP_K} (0 keeps all)")
        if not (is_number(self.min_p) and 0 <= self.min_p <= 1):
            raise BadRequest("'min_p' must be a number from 0 to 1 (0 is off)")
        if not (is_number(self.repeat_penalty) and 0 < self.repeat_penalty <= MAX_PENALTY):
            raise BadRequest(
                f"'repeat_penalty' must be a number above 0 and at most {MAX_PENALTY} (1 is off)"
            )
        for key in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, key)
            if not (is_number(value) and -2 <= value <= 2):
                raise BadRequest(f"'{key}' must be a number from -2 to 2 (0 is off)")
            object.__setattr__(self, key, float(value))
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise BadRequest(f"'seed' must be an integer from 0 to {MAX_SEED}")
        object.__setattr__(self, "stop", tuple(stop))
        for key in ("temperature", "top_p", "min_p", "repeat_penalty"):
            object.__setattr__(self, key, float(getattr(self, key)))

    def _check_output_control(self) -> None:
        grammar, schema = self.grammar, self.json_schema
        if grammar is not None and not (
            isinstance(grammar, str) and 0 < len(grammar) <= MAX_GRAMMAR_CHARS
        ):
            raise BadRequest(
                f"'grammar' must be a non-empty GBNF string of at most {MAX_GRAMMAR_CHARS} "
                "characters"
            )
        if schema is not None and not isinstance(schema, Mapping):
            raise BadRequest("'json_schema' must be a map (a JSON schema; {} takes any JSON)")
        if grammar is not None and schema is not None:
            raise BadRequest("give 'grammar' or 'json_schema', not both")
        if type(self.logprobs) is not bool:
            raise BadRequest("'logprobs' must be a boolean")
        top = self.top_logprobs
        if not (is_int(top) and 0 <= top <= MAX_TOP_LOGPROBS):
            raise BadRequest(f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}")
        if top and not self.logprobs:
            raise BadRequest("'top_logprobs' needs 'logprobs': true")

    @property
    def constrained(self) -> bool:
        """Whether a grammar (given, or made from a JSON schema) constrains the output."""
        return self.grammar is not None or self.json_schema is not None


SAMPLING_KEYS = frozenset(f.name for f in dataclasses.fields(Sampling))
DEFAULT_SAMPLING = Sampling()


@dataclass(frozen=True, kw_only=True)
class Infer(InferenceRequest):
    """``infer``: named input tensors, views on the message's frames. A request with tensors
    in the client's shared-memory regions decodes to a ``RegionInfer`` instead."""

    inputs: Mapping[str, np.ndarray[Any, Any]] = field(default_factory=dict)

    @classmethod
    def wire_keys(cls) -> frozenset[str]:
        return super().wire_keys() | {"outputs"}  # outputs to write into regions

    @classmethod
    def from_wire(
        cls: type[C],
        envelope: dict[str, Any],
        header: Mapping[str, Any],
        frames: Sequence[Buffer],
        limits: Limits,
    ) -> C:
        values = given(header)
        specs = values.pop("inputs", [])
        targets = values.pop("outputs", None)
        if targets is not None or type(specs) is not list or len(specs) != len(frames):
            decoded = RegionInfer.decode(
                envelope, values, specs=specs, targets=targets, frames=frames, limits=limits
            )
            return cast(C, decoded)
        request = cls(**envelope, **values)  # the header's own checks first
        # still being made: the tensors are its last field, decoded once the rest is valid
        object.__setattr__(request, "inputs", decode_tensors(specs, frames, limits))
        return request


@dataclass(frozen=True, kw_only=True)
class RegionInfer(Infer):
    """An ``infer`` with tensors in the client's shared-memory regions: inputs there as
    ``refs``, not yet views, and ``outputs`` to write there. The service resolves it to a plain
    ``Infer`` before it is queued (``edged.regions``): a runner never sees one."""

    #: inputs in regions (each one's ``index`` is its place among the inputs)
    refs: tuple[TensorRef, ...] = ()
    #: output name -> where in a region to write it rather than send it in a frame
    outputs: Mapping[str, RegionRef] = field(default_factory=dict)

    @classmethod
    def decode(
        cls,
        envelope: dict[str, Any],
        values: dict[str, Any],
        *,
        specs: Any,
        targets: Any,
        frames: Sequence[Buffer],
        limits: Limits,
    ) -> RegionInfer:
        """From the header's values, once ``Infer.from_wire`` found tensors that lie in regions
        (or a frame count that is wrong: decoding says which)."""
        request = cls(**envelope, **values)
        inputs, refs = decode_described(specs, frames, limits)
        object.__setattr__(request, "inputs", inputs)
        object.__setattr__(request, "refs", refs)
        if targets is not None:
            object.__setattr__(request, "outputs", decode_targets(targets, limits))
        return request

    def resolved(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Infer:
        """The plain request, its inputs all views now."""
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(Infer)}
        return Infer(**{**plain, "inputs": inputs})


@dataclass(frozen=True, kw_only=True)
class TextRequest(InferenceRequest):
    """A request that generates text: the sampling settings come as header keys of their own."""

    sampling: Sampling = DEFAULT_SAMPLING

    #: the header key of what the text continues (``prompt``, ``messages``)
    source_key = ""

    @classmethod
    def wire_keys(cls) -> frozenset[str]:
        return frozenset({"model", "version", "deadline_ms", cls.source_key}) | SAMPLING_KEYS

    @classmethod
    def wire_values(cls, header: Mapping[str, Any]) -> dict[str, Any]:
        values = given(header)
        options = {key: values.pop(key) for key in SAMPLING_KEYS & values.keys()}
        values["sampling"] = Sampling(**options) if options else DEFAULT_SAMPLING
        return values


@dataclass(frozen=True, kw_only=True)
class Generate(TextRequest):
    """``generate``: text to continue, and how."""

    prompt: str = ""
    source_key = "prompt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.prompt, str) or not self.prompt:
            raise BadRequest("'prompt' must be a non-empty string")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str

    @classmethod
    def from_wire(cls, index: int, message: Any) -> ChatMessage:
        """A message as ``{role, content}``; content may be OpenAI's list of text parts."""
        where = f"messages[{index}]"
        if not isinstance(message, Mapping) or not {"role", "content"} <= message.keys():
            raise BadRequest(f"{where} must be a map with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise BadRequest(f"{where}.role must be one of {', '.join(sorted(CHAT_ROLES))}")
        if isinstance(content, list):
            if not all(
                isinstance(part, Mapping)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
                for part in content
            ):
                raise BadRequest(f"{where}.content parts must be {{type: text, text: string}}")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise BadRequest(f"{where}.content must be a string or a list of text parts")
        return cls("system" if role == "developer" else role, content)


@dataclass(frozen=True, kw_only=True)
class Chat(TextRequest):
    """``chat``: messages, formatted by the model's chat template and continued as the
    assistant's turn."""

    messages: tuple[ChatMessage, ...] = ()
    source_key = "messages"

    def __post_init__(self) -> None:
        super().__post_init__()
        messages: Any = self.messages
        if not isinstance(messages, (list, tuple)) or not 0 < len(messages) <= MAX_MESSAGES:
            raise BadRequest(f"'messages' must be an array of 1 to {MAX_MESSAGES} messages")
        object.__setattr__(
            self,
            "messages",
            tuple(
                m if isinstance(m, ChatMessage) else ChatMessage.from_wire(i, m)
                for i, m in enumerate(messages)
            ),
        )


@dataclass(frozen=True, kw_only=True)
class Embed(InferenceRequest):
    """``embed``: one or more texts (the header's ``input``), one embedding each."""

    texts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        texts: Any = self.texts
        texts = (texts,) if isinstance(texts, str) else texts
        if (
            not isinstance(texts, (list, tuple))
            or not 0 < len(texts) <= MAX_EMBED_TEXTS
            or not all(isinstance(text, str) and text for text in texts)
        ):
            raise BadRequest(
                f"'input' must be a non-empty string or an array of 1 to {MAX_EMBED_TEXTS} of them"
            )
        object.__setattr__(self, "texts", tuple(texts))

    @classmethod
    def wire_keys(cls) -> frozenset[str]:
        return frozenset({"model", "version", "deadline_ms", "input"})

    @classmethod
    def wire_values(cls, header: Mapping[str, Any]) -> dict[str, Any]:
        values = given(header)
        values["texts"] = values.pop("input", ())
        return values


#: what a model's runner is asked to do
Inference = Infer | Generate | Chat | Embed
