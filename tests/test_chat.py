"""``chat`` through a live daemon: messages rendered by the model's chat template (the file's,
or the config's override) and streamed as ``generate`` streams its prompt."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from edged.client import AsyncClient, Client, Completion
from edged.errors import BadRequest, ModelLoadError, OpNotSupported
from edged.models.calls import ChatMessage
from edged.models.chat import METADATA_KEY, ChatTemplate
from edged.testing import DaemonProcess
from edged.tinyllama import CHAT_TEMPLATE
from tests.conftest import DaemonFactory, llm_config

pytestmark = pytest.mark.gguf

#: the override: contents alone, one a line, behind an explicit BOS (not to be doubled)
OVERRIDE = "{{ bos_token }}{% for message in messages %}{{ message.content }}\n{% endfor %}"
MESSAGES: list[dict[str, Any]] = [
    {"role": "developer", "content": "be kind"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}],
    },
]


@pytest.fixture(scope="module")
def bare_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model without a chat template."""
    from edged.tinyllama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("bare") / "bare.gguf", chat_template=None)


@pytest.fixture
def chat_daemon(
    start_daemon: DaemonFactory, gguf_models: dict[str, Path], bare_llm: Path
) -> DaemonProcess:
    return start_daemon(
        {
            "models": {
                "llm": llm_config(gguf_models["q8"]),
                "override": llm_config(gguf_models["q8"], gguf={"chat_template": OVERRIDE}),
                "bare": llm_config(bare_llm),
                # loaded when first asked for: its load fails
                "broken": llm_config(
                    gguf_models["q8"], preload=False, gguf={"chat_template": "{% for %}"}
                ),
            }
        }
    )


def rendered(template: str, messages: list[dict[str, Any]]) -> str:
    """The prompt text the daemon makes of ``messages`` with ``template``."""
    chat = ChatTemplate.select({METADATA_KEY: template}, "", "<s>", "</s>")
    assert chat is not None
    return chat.render([ChatMessage.from_wire(i, m) for i, m in enumerate(messages)])


def test_chat_streams_text_then_a_final_reply_with_usage(chat_daemon: DaemonProcess) -> None:
    with chat_daemon.client() as client:
        stream = client.chat("llm", MESSAGES, max_tokens=12, temperature=0)
        pieces = list(stream)
    done = stream.completion
    assert done.finish_reason == "length" and done.completion_tokens == 12
    assert done.text == "".join(pieces) and len(pieces) >= 1
    assert done.prompt_tokens == 32  # <s>, then "system: be kind\nuser: ..." in 31 tokens
    assert done.timing["ttft_us"] > 0 and done.model == "llm"
    assert done.logprobs == []  # not asked for


def test_greedy_chat_is_greedy_generate_on_the_rendered_prompt(
    chat_daemon: DaemonProcess,
) -> None:
    prompt = rendered(CHAT_TEMPLATE, MESSAGES)
    assert prompt == "system: be kind\nuser: hello world\nassistant:"
    with chat_daemon.client() as client:
        chat = client.chat("llm", MESSAGES, max_tokens=16, temperature=0).text()
        plain = client.generate("llm", prompt, max_tokens=16, temperature=0).text()
    assert chat.text == plain.text
    assert chat.prompt_tokens == plain.prompt_tokens


def test_the_configs_template_replaces_the_files_and_bos_is_not_doubled(
    chat_daemon: DaemonProcess,
) -> None:
    prompt = rendered(OVERRIDE, MESSAGES)
    assert prompt == "<s>be kind\nhello world\n"
    with chat_daemon.client() as client:
        files = client.chat("llm", MESSAGES, max_tokens=16, temperature=0).text()
        chat = client.chat("override", MESSAGES, max_tokens=16, temperature=0).text()
        # the rendered text starts with BOS's text: the daemon adds none, generate adds one
        plain = client.generate(
            "override", prompt[len("<s>") :], max_tokens=16, temperature=0
        ).text()
    assert chat.prompt_tokens != files.prompt_tokens
    assert (chat.text, chat.prompt_tokens) == (plain.text, plain.prompt_tokens)


def test_a_model_without_a_template_refuses_chat_and_serves_on(
    chat_daemon: DaemonProcess,
) -> None:
    with chat_daemon.client() as client:
        with pytest.raises(OpNotSupported, match="chat_template"):
            client.chat("bare", MESSAGES, max_tokens=4).text()
        assert client.generate("bare", "hello", max_tokens=3).text().completion_tokens == 3


def test_a_template_that_does_not_compile_fails_the_load(chat_daemon: DaemonProcess) -> None:
    with chat_daemon.client(timeout=30) as client:
        with pytest.raises(ModelLoadError, match=r"gguf\.chat_template is not a valid Jinja"):
            client.chat("broken", MESSAGES, max_tokens=4).text()
        assert client.chat("llm", MESSAGES, max_tokens=3).text().completion_tokens == 3


#: messages -> what BAD_REQUEST's message says of them
BAD_MESSAGES: list[tuple[Any, str]] = [
    ("hello", r"'messages' must be an array of 1 to \d+ messages"),
    ([], r"'messages' must be an array of 1 to \d+ messages"),
    ([{"content": "hi"}], r"messages\[0\] must be a map with 'role' and 'content'"),
    (
        [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "hi"}],
        r"messages\[1\]\.role must be one of assistant, developer, system, tool, user",
    ),
    (
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        r"messages\[0\]\.content parts must be \{type: text, text: string\}",
    ),
    ([{"role": "user", "content": 7}], r"messages\[0\]\.content must be a string"),
    # valid for the protocol, but the tiny template has no such role: its raise_exception
    (
        [{"role": "tool", "content": "42"}],
        "the chat template refused the messages: the tiny chat template has no role tool",
    ),
]


def test_bad_messages_are_refused_and_serving_goes_on(chat_daemon: DaemonProcess) -> None:
    with chat_daemon.client() as client:
        for messages, problem in BAD_MESSAGES:
            with pytest.raises(BadRequest, match=problem):
                client.chat("llm", messages, max_tokens=4).text()
        assert client.chat("llm", MESSAGES, max_tokens=3).text().completion_tokens == 3


def test_logprobs_come_per_token_and_fold_into_the_completion(
    chat_daemon: DaemonProcess,
) -> None:
    with chat_daemon.client() as client:
        stream = client.chat(
            "llm", MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
        )
        done = stream.text()
    assert len(done.logprobs) == done.completion_tokens == 8
    assert "".join(entry["token"] for entry in done.logprobs) == done.text
    for entry in done.logprobs:
        top = entry["top_logprobs"]
        assert len(top) == 3 and all(isinstance(alt["token"], str) for alt in top)
        ranked = [alt["logprob"] for alt in top]
        assert ranked == sorted(ranked, reverse=True) and ranked[0] <= 0
        # greedy took the most likely token: its own log-probability is the first alternative's
        assert math.isclose(entry["logprob"], ranked[0], abs_tol=1e-5)
        assert entry["token"] == top[0]["token"]


def test_the_async_client_chats_as_the_blocking_one(chat_daemon: DaemonProcess) -> None:
    async def chat() -> tuple[list[str], Completion]:
        async with AsyncClient(chat_daemon.endpoint, timeout=20) as client:
            done = Completion()
            stream = client.chat("llm", MESSAGES, max_tokens=10, temperature=0, completion=done)
            return [text async for text in stream], done

    pieces, done = asyncio.run(chat())
    with Client(chat_daemon.endpoint, timeout=20) as client:
        blocking = client.chat("llm", MESSAGES, max_tokens=10, temperature=0).text()
    assert "".join(pieces) == done.text == blocking.text
    assert done.completion_tokens == 10
