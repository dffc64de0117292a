"""A model's chat template: messages in, prompt text out, for ``chat``.

The template is Jinja, as Hugging Face writes them into a GGUF's ``tokenizer.chat_template``;
llama-cpp-python renders it in a sandboxed environment with the names such templates expect
(``messages``, ``bos_token``, ``eos_token``, ``add_generation_prompt``, ``raise_exception``).
``llama_cpp`` is imported only here, when a GGUF model has a template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edged.errors import BadRequest, ModelLoadError
from edged.models.calls import ChatMessage

METADATA_KEY = "tokenizer.chat_template"


class ChatTemplate:
    """A compiled template: compiling once at load time makes a broken one a load error."""

    def __init__(self, formatter: Any) -> None:
        self._formatter = formatter

    @classmethod
    def select(
        cls, metadata: Mapping[str, str], override: str, bos_token: str, eos_token: str
    ) -> ChatTemplate | None:
        """The config's override if set, else the GGUF's ``tokenizer.chat_template`` metadata,
        else None (the model serves no ``chat``)."""
        if override:
            return cls._compile(override, "the config's gguf.chat_template", bos_token, eos_token)
        found = metadata.get(METADATA_KEY)
        if not found:
            return None
        return cls._compile(found, f"the file's {METADATA_KEY}", bos_token, eos_token)

    @classmethod
    def _compile(cls, source: str, origin: str, bos_token: str, eos_token: str) -> ChatTemplate:
        import jinja2
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        try:
            formatter = Jinja2ChatFormatter(source, eos_token, bos_token)
        except jinja2.TemplateError as exc:
            raise ModelLoadError(f"{origin} is not a valid Jinja template: {exc}") from None
        return cls(formatter)

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text, ending with the generation prompt (the assistant's turn to come)."""
        turns = [{"role": m.role, "content": m.content} for m in messages]
        try:
            rendered = self._formatter(messages=turns)
        # The template is foreign code run on the request's messages: whatever it raises
        # (its raise_exception, an undefined name, a type error) refuses this request alone.
        except Exception as exc:
            raise BadRequest(f"the chat template refused the messages: {exc}") from None
        return str(rendered.prompt)
