"""A generation's ``Sampling`` as a llama.cpp sampler chain, with grammar and JSON schema.

The chain's order is llama-cpp-python's own (penalties, grammar, then greedy or top-k, top-p,
min-p, temperature and a seeded draw), so a seeded generation picks what it would pick there.
Chains are built on the event loop when a request is admitted: a grammar that does not parse is
the request's error, not its model thread's.
"""

from __future__ import annotations

import json
import random
from typing import Any

from edged.errors import BadRequest
from edged.models.calls import Sampling

#: how many recent tokens the repetition penalties look at (llama-cpp-python's default)
PENALTY_LAST_N = 64


class TokenSampler:
    """One generation's llama.cpp sampler chain; freed by ``close`` (or when collected, for a
    request that never started)."""

    def __init__(self, llama_cpp: Any, chain: Any) -> None:
        self._llama_cpp = llama_cpp
        self.chain = chain

    def sample(self, ctx: Any, row: int) -> int:
        """The next token from the logits of batch row ``row`` (accepted into the chain, so a
        grammar and the penalties move on with it)."""
        return int(self._llama_cpp.llama_sampler_sample(self.chain, ctx, row))

    def close(self) -> None:
        if self.chain is not None:
            self._llama_cpp.llama_sampler_free(self.chain)
            self.chain = None

    def __del__(self) -> None:
        self.close()


def build_sampler(llama_cpp: Any, vocab: Any, n_vocab: int, sampling: Sampling) -> TokenSampler:
    """The chain for ``sampling``; a grammar or JSON schema llama.cpp cannot use is
    ``BadRequest``."""
    lib = llama_cpp
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    sampler = TokenSampler(lib, chain)

    def add(stage: Any) -> None:
        lib.llama_sampler_chain_add(sampler.chain, stage)

    s = sampling
    if s.repeat_penalty != 1.0 or s.presence_penalty or s.frequency_penalty:
        add(
            lib.llama_sampler_init_penalties(
                n_vocab, PENALTY_LAST_N, s.repeat_penalty, s.frequency_penalty, s.presence_penalty
            )
        )
    grammar = grammar_text(s)
    if grammar is not None:
        stage = lib.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not stage:
            sampler.close()
            what = "'json_schema' gave a grammar that" if s.json_schema is not None else "'grammar'"
            raise BadRequest(f"{what} does not parse as GBNF (llama.cpp's grammar format)")
        add(stage)
    if s.temperature == 0.0:
        add(lib.llama_sampler_init_greedy())
        return sampler
    seed = s.seed if s.seed is not None else random.getrandbits(32)
    add(lib.llama_sampler_init_top_k(s.top_k))
    add(lib.llama_sampler_init_top_p(s.top_p, 1))
    add(lib.llama_sampler_init_min_p(s.min_p, 1))
    add(lib.llama_sampler_init_temp(s.temperature))
    add(lib.llama_sampler_init_dist(seed))
    return sampler


def grammar_text(sampling: Sampling) -> str | None:
    """The GBNF that constrains the output: the request's own, or one made from its schema."""
    if sampling.json_schema is None:
        return sampling.grammar
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(json.dumps(sampling.json_schema)))
    except Exception as exc:  # the converter raises plain exceptions for schemas it cannot do
        raise BadRequest(f"'json_schema' cannot be turned into a grammar: {exc}") from None
