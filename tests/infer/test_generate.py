"""Generation: greedy tokens equal transformers' generate for every family, single and left-padded
batches; EOS, stop strings, streaming, seeded sampling; bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as T

import evolm
from evolm.errors import ConfigError
from evolm.infer.generate import generate, generate_stream
from helpers.hf_parity import build_hf

S = dict(vocab_size=97, hidden_size=64, num_attention_heads=4, max_position_embeddings=64)
L = dict(**S, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2)

CONFIGS = {
    "llama": lambda: T.LlamaConfig(**L),
    "mistral-window": lambda: T.MistralConfig(**L, sliding_window=5),
    "qwen2": lambda: T.Qwen2Config(**L),
    "qwen3": lambda: T.Qwen3Config(**L, head_dim=16),
    "olmo2": lambda: T.Olmo2Config(**L),
    "gemma": lambda: T.GemmaConfig(**L, head_dim=16),
    "gemma2-window": lambda: T.Gemma2Config(**L, head_dim=16, sliding_window=5),
    "phi3": lambda: T.Phi3Config(**L, pad_token_id=0),
    "gpt2": lambda: T.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": lambda: T.GPTNeoXConfig(**S, intermediate_size=96, num_hidden_layers=2),
    "bloom": lambda: T.BloomConfig(vocab_size=97, hidden_size=64, n_layer=2, n_head=4),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = {}
    for name, make in CONFIGS.items():
        hf = build_hf(make())
        d = tmp_path_factory.mktemp(name)
        hf.save_pretrained(d)
        out[name] = (hf, evolm.load_model(d))
    return out


def _padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_matches_transformers(pairs, name):
    hf, model = pairs[name]
    ids = torch.randint(3, 97, (1, 7), generator=torch.Generator().manual_seed(1))
    ref = hf.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, ids, 16), ref)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_left_padded_batch_matches_transformers(pairs, name):
    hf, model = pairs[name]
    ids, mask = _padded_batch()
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ours = generate(model, ids, 12, attention_mask=mask)
    assert torch.equal(ours, ref)


def test_seeded_sampling_matches_transformers_and_repeats(pairs):
    hf, model = pairs["llama"]
    ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    torch.manual_seed(123)
    ref = hf.generate(ids, max_new_tokens=10, do_sample=True, pad_token_id=0, **kw)
    ours = generate(model, ids, 10, seed=123, **kw)
    assert torch.equal(ours, ref)
    assert torch.equal(generate(model, ids, 10, seed=123, **kw), ours)


def test_eos_stops_rows_and_fills(pairs):
    _, model = pairs["llama"]
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    free = generate(model, ids, 10)
    eos = int(free[0, 6 + 3])  # the 4th generated token becomes "EOS"
    first = (free[0, 6:] == eos).nonzero()[0].item()
    out = generate(model, ids, 10, eos_token_id=eos)
    assert out.shape[1] == 6 + first + 1 and int(out[0, -1]) == eos


def test_stop_strings_end_generation(pairs):
    _, model = pairs["llama"]

    class Chars:  # a toy tokenizer: id i is the character chr(65 + i % 26)
        @staticmethod
        def decode(ids):
            return "".join(chr(65 + i % 26) for i in ids)

    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(4))
    free = generate(model, ids, 12)
    text = Chars.decode(free[0, 6:].tolist())
    stop = text[4:6]
    out = generate(model, ids, 12, stop_strings=[stop], tokenizer=Chars)
    assert stop in Chars.decode(out[0, 6:].tolist())
    assert out.shape[1] <= 6 + text.index(stop) + 2
    with pytest.raises(ConfigError, match="tokenizer"):
        generate(model, ids, 3, stop_strings=["x"])


def test_stream_yields_the_same_tokens(pairs):
    _, model = pairs["gpt2"]
    ids = torch.randint(3, 97, (2, 4), generator=torch.Generator().manual_seed(5))
    streamed = torch.stack(list(generate_stream(model, ids, 8)), dim=1)
    assert torch.equal(torch.cat([ids, streamed], 1), generate(model, ids, 8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"max_new_tokens": 60}, "exceeds the context length 64"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_k": -2}, "top_k=-2"),
    ],
)
def test_bad_generation_arguments(pairs, kwargs, message):
    _, model = pairs["llama"]
    ids = torch.randint(3, 97, (1, 6))
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ConfigError, match=message):
        generate(model, ids, **args)


def test_bad_prompts(pairs):
    _, model = pairs["llama"]
    with pytest.raises(ConfigError, match="empty prompt"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ConfigError, match=r"token id 97 is out of the vocabulary; allowed ids are 0..96"):
        generate(model, torch.tensor([[1, 97]]), 4)
    with pytest.raises(ConfigError, match="longer than the context length 64"):
        generate(model, torch.ones(1, 65, dtype=torch.long), 4)


def test_nan_logits_stop_generation(pairs):
    _, model = pairs["llama"]
    broken = evolm.build_model(model.cfg, seed=0)
    with torch.no_grad():
        broken.model.norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        generate(broken, torch.tensor([[1, 2, 3]]), 4)


@pytest.mark.parametrize(
    "how", [dict(native=False), dict(compile=True, native=False), dict()], ids=["eager", "compiled", "native"]
)
def test_nan_logits_in_a_decode_step_stop_generation(pairs, how):
    """NaN appears only once the first generated token is fed back (its embedding row is NaN): the
    decode step's check stops generation, in the compiled greedy step too (which checks in the graph)
    and in the native step (evolm.infer.native_step, where the kernels load)."""
    _, model = pairs["llama"]
    broken = evolm.build_model(dataclasses.replace(model.cfg, tie_embeddings=False), seed=0)
    prompt = torch.tensor([[1, 2, 3]])
    first = int(generate(broken, prompt, 1)[0, -1])
    assert first not in prompt[0].tolist()
    with torch.no_grad():
        broken.model.embed_tokens.weight[first] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite \(NaN/Inf\) logits in batch rows \[0\]"):
        generate(broken, prompt, 4, **how)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_static_cache_decodes_like_the_growing_one(pairs, name):
    """A StaticKVCache (every slot attended, the causal rule hiding unwritten ones) gives the same
    tokens as transformers, single and left-padded."""
    hf, model = pairs[name]
    ids, mask = _padded_batch(seed=3)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    cache = model.new_cache(3, 40, static=True)
    full = [layer.window is None for layer in model.model.layers]  # windowed layers keep a ring
    assert [type(c).__name__ == "StaticKVCache" for c in cache] == full
    assert torch.equal(generate(model, ids, 12, attention_mask=mask, cache=cache), ref)


@pytest.mark.parametrize("name", ["llama", "gemma2-window"])
def test_compiled_decode_matches_transformers(pairs, name):
    """generate(compile=True): decode steps through torch.compile over a static cache, same tokens;
    a second, longer generation reuses the graph instead of compiling per length."""
    torch._dynamo.reset()
    hf, model = pairs[name]
    ids, mask = _padded_batch(seed=4)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, ids, 12, attention_mask=mask, compile=True), ref)
    single = ids[2:, :]
    ref = hf.generate(single, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, single, 20, compile=True, native=False), ref)
