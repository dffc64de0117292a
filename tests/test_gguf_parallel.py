"""Parallel generations from one GGUF model, and output constrained by a grammar, through a live
daemon: N streams at once give the text N streams one after another give, slots are freed by a
cancel or a vanished client, and grammar-constrained output always parses."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edged.client import Client
from edged.errors import BadRequest
from edged.testing import DaemonProcess
from tests.conftest import DaemonFactory, llm_config

pytestmark = pytest.mark.gguf

PARALLEL = 4
#: a context long enough for generations that outlast the test's steps
LONG = 4096
PROMPTS = (
    "the cat and the dog were in the house",
    "hello world",
    "people made words that could find the moon and the sun over the green edge model",
    "one two",
)


@pytest.fixture
def slots_daemon(start_daemon: DaemonFactory, gguf_models: dict[str, Path]) -> DaemonProcess:
    return start_daemon(
        {
            "models": {
                "llm": llm_config(gguf_models["q8"], gguf={"parallel": PARALLEL, "n_ctx": LONG}),
                "one": llm_config(gguf_models["q8"]),
            }
        }
    )


def greedy(client: Client, model: str, prompt: str, max_tokens: int = 40) -> str:
    return client.generate(model, prompt, max_tokens=max_tokens, temperature=0).text().text


def slots(daemon: DaemonProcess, model: str = "llm") -> dict[str, int]:
    with daemon.client() as client:
        found: dict[str, int] = client.describe(model)["slots"]
    return found


def wait_for(condition: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_parallel_streams_give_the_text_of_sequential_ones(slots_daemon: DaemonProcess) -> None:
    with slots_daemon.client() as client:
        alone = [greedy(client, "one", prompt) for prompt in PROMPTS]
    together: dict[int, str] = {}
    started = threading.Barrier(len(PROMPTS))

    def run(index: int) -> None:
        with slots_daemon.client() as client:
            started.wait()
            together[index] = greedy(client, "llm", PROMPTS[index])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [together[i] for i in range(len(PROMPTS))] == alone
    assert all(alone)  # the comparison is between real texts
    with slots_daemon.client() as client:  # a slot reused for a repeated prompt: same text
        assert [greedy(client, "llm", prompt) for prompt in PROMPTS] == alone


def test_every_slot_streams_at_once_and_a_fifth_waits_for_a_free_one(
    slots_daemon: DaemonProcess,
) -> None:
    assert slots(slots_daemon) == {"total": PARALLEL, "busy": 0}
    assert slots(slots_daemon, "one") == {"total": 1, "busy": 0}
    clients = [slots_daemon.client() for _ in range(PARALLEL + 1)]
    try:
        streams = [
            client.generate("llm", "the tree", max_tokens=LONG - 16, temperature=0)
            for client in clients[:PARALLEL]
        ]
        firsts = [next(iter(stream)) for stream in streams]  # all four stream at once
        assert all(isinstance(first, str) for first in firsts)
        assert slots(slots_daemon)["busy"] == PARALLEL
        with slots_daemon.control() as control:
            metrics = control.command("metrics")["text"]
        assert f'edged_running_requests{{model="llm",version="1"}} {PARALLEL}.0' in metrics
        waiting = clients[PARALLEL].generate("llm", "hello", max_tokens=3, temperature=0)
        time.sleep(0.3)
        assert slots(slots_daemon)["busy"] == PARALLEL  # the fifth is queued, not running
        streams[0].cancel()  # frees a slot at once: the fifth gets it
        assert streams[0].text().finish_reason == "cancelled"
        assert waiting.text().completion_tokens == 3
        for stream in streams[1:]:
            stream.cancel()
            assert stream.text().finish_reason == "cancelled"
        wait_for(lambda: slots(slots_daemon)["busy"] == 0, "cancelled slots were not freed")
    finally:
        for client in clients:
            client.close()


VANISHING_CLIENTS = """
import os, sys
from edged.client import Client
clients = [Client(sys.argv[1], timeout=20) for _ in range(3)]
streams = [c.generate("llm", "the tree", max_tokens=4000, temperature=0) for c in clients]
for stream in streams:
    next(iter(stream))
print("streaming", flush=True)
os._exit(0)  # gone mid-stream, without a cancel
"""


def test_clients_vanishing_mid_stream_free_their_slots(slots_daemon: DaemonProcess) -> None:
    subprocess.run(
        [sys.executable, "-c", VANISHING_CLIENTS, slots_daemon.endpoint],
        check=True,
        timeout=60,
        capture_output=True,
    )
    wait_for(lambda: slots(slots_daemon)["busy"] == 0, "a vanished client's slot stayed busy")
    with slots_daemon.client() as client:
        assert greedy(client, "llm", "hello", max_tokens=2)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
}


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_json_schema_output_always_parses_and_follows_the_schema(
    slots_daemon: DaemonProcess, seed: int
) -> None:
    with slots_daemon.client() as client:
        done = client.generate(
            "llm", "the cat", max_tokens=200, temperature=1.0, seed=seed, json_schema=PERSON
        ).text()
    assert done.finish_reason == "stop", done.text
    value = json.loads(done.text)
    assert set(value) == {"name", "age", "pet"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert isinstance(value["age"], int)
    assert value["pet"] in ("cat", "dog")


def test_a_gbnf_grammar_constrains_the_text_and_a_bad_one_is_refused(
    slots_daemon: DaemonProcess,
) -> None:
    grammar = 'root ::= ("yes" | "no") " " [0-9] [0-9]'
    with slots_daemon.client() as client:
        texts = {
            client.generate(
                "llm", "hello", max_tokens=20, temperature=1.5, seed=seed, grammar=grammar
            )
            .text()
            .text
            for seed in range(5)
        }
        for text in texts:
            word, number = text.split(" ")
            assert word in ("yes", "no") and len(number) == 2 and number.isdigit()
        any_json = client.generate("llm", "x", max_tokens=60, temperature=0, json_schema={})
        json.loads(any_json.text().text)
        with pytest.raises(BadRequest, match="does not parse as GBNF"):
            client.generate("llm", "hello", grammar="root ::= (").text()
        with pytest.raises(BadRequest, match="'grammar' or 'json_schema', not both"):
            client.generate("llm", "hello", grammar="root ::= x", json_schema={}).text()
        with pytest.raises(BadRequest, match="json_schema"):
            client.generate("llm", "hello", json_schema=[1]).text()
        assert greedy(client, "llm", "hello", max_tokens=2)  # still serving
