"""Multi-turn chat that keeps its KV cache between turns.

Each turn renders the whole conversation with the model's chat template, finds the longest prefix
already in the cache, drops the rest of the cache and prefills only the new tokens. Re-rendering
(rather than appending raw ids) keeps the prompt exactly what the template defines, even when a
template rewrites earlier turns.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from evolm.infer.generate import generate_stream
from evolm.infer.sampling import SamplingConfig
from evolm.tokenizer import Tokenizer

_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def turn_end_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids that end an assistant turn: EOS plus the end-of-turn tokens of common chat formats
    (ChatML, Llama 3, Gemma, Phi-3) that this vocabulary has."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for end in _TURN_ENDS:
        i = tokenizer.token_to_id(end)
        if i is not None and i not in ids:
            ids.append(i)
    return ids


@dataclass
class ChatSession:
    """A conversation with one model.

    Attributes:
        model: The causal LM.
        tokenizer: Its tokenizer, with a chat template.
        sampling: How replies are sampled.
        max_new_tokens: Longest reply.
        system: Optional system prompt.
        max_len: Tokens the cache holds (default: the model's context).
        messages: The conversation so far.
        reused_tokens: Tokens the last turn found already cached (for inspection and tests).
    """

    model: nn.Module
    tokenizer: Tokenizer
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int = 256
    system: str | None = None
    max_len: int | None = None
    seed: int | None = None
    messages: list[dict] = field(default_factory=list)
    reused_tokens: int = 0
    _cache: list | None = None
    _cached_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.system:
            self.messages.append({"role": "system", "content": self.system})

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the assistant's reply as text pieces."""
        self.messages.append({"role": "user", "content": text})
        ids = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        if self._cache is None:
            self._cache = self.model.new_cache(1, self.max_len or self.model.cfg.max_seq_len)
        common = 0
        for a, b in zip(self._cached_ids, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one new token to run
        try:
            for c in self._cache:
                c.truncate(common)
        except ValueError:  # a rolling cache cannot rewind that far: start over
            self._cache = self.model.new_cache(1, self.max_len or self.model.cfg.max_seq_len)
            common = 0
        self.reused_tokens = common
        new = torch.tensor([ids[common:]])
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        stops = turn_end_ids(self.tokenizer)
        reply: list[int] = []
        s = self.sampling
        for token in generate_stream(
            self.model,
            new,
            self.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            repetition_penalty=s.repetition_penalty,
            eos_token_id=stops,
            seed=self.seed,
            cache=self._cache,
        ):
            tid = int(token[0])
            if tid in stops:
                break
            reply.append(tid)
            piece = decoder.step(tid)
            if piece:
                yield piece
        if tail := decoder.finish():
            yield tail
        # The cache holds the prompt and every sampled token but the last (never fed back).
        self._cached_ids = (ids + reply)[: self._cache[0].length]
        self.messages.append({"role": "assistant", "content": self.tokenizer.decode(reply, skip_special_tokens=True)})
