"""Multi-turn chat on the real SmolLM2: the cache is reused between turns and changes nothing."""

from __future__ import annotations

import torch

from evolm.infer.chat import ChatSession, turn_end_ids
from evolm.infer.generate import generate


def test_second_turn_reuses_cache_and_matches_fresh_generation(smollm2_evolm):
    model, tok = smollm2_evolm
    chat = ChatSession(model, tok, max_new_tokens=12, max_len=512)
    first = "".join(chat.send("Name a colour."))
    assert first.strip()
    second = "".join(chat.send("And a fruit?"))
    assert chat.reused_tokens > 20  # the first turn stayed in the cache
    # Fresh, uncached generation over the same rendered conversation gives the same reply.
    ids = tok.apply_chat_template(chat.messages[:-1], add_generation_prompt=True)
    out = generate(model, torch.tensor([ids]), 12, eos_token_id=turn_end_ids(tok))
    fresh = tok.decode([t for t in out[0, len(ids) :].tolist() if t not in turn_end_ids(tok)], skip_special_tokens=True)
    assert second == fresh
