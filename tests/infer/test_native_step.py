"""Native decode steps (evolm.infer.native_step): each step's logits and cache writes equal the module
path's, generate's tokens equal transformers', for every shape it covers; what it does not cover keeps
the module path and ``unsupported`` says why."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers as T

import evolm
from evolm.infer.generate import decode_one_token, generate, generate_stream, prefill
from evolm.infer.native_step import native_step, unsupported
from evolm.nn import decode_kernels
from evolm.nn.lora import LoRAConfig, apply_lora
from helpers.hf_parity import build_hf, relative_error

pytestmark = pytest.mark.skipif(not decode_kernels.available(), reason="needs the AVX-512 decode kernels")

V = 97
# 2 layers, width 64, 4 query heads over 2 key/value heads
SMALL = dict(
    vocab_size=V,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    num_hidden_layers=2,
    max_position_embeddings=64,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CONFIGS = {
    "gqa": lambda: T.LlamaConfig(**SMALL),  # grouped-query attention, untied head
    # widths that are not multiples of 16 (masked tails everywhere), multi-head attention
    "mha-odd": lambda: T.LlamaConfig(
        **{**SMALL, "hidden_size": 72, "num_attention_heads": 3, "num_key_value_heads": 3, "intermediate_size": 100}
    ),
    # one key/value head: fewer than the threads
    "mqa-tied-llama3": lambda: T.LlamaConfig(
        **{**SMALL, "num_key_value_heads": 1}, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE
    ),
    "qwen2": lambda: T.Qwen2Config(**SMALL),  # q/k/v biases
    "mistral": lambda: T.MistralConfig(**SMALL, sliding_window=None),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, make in CONFIGS.items():
        hf = build_hf(make())
        d = tmp_path_factory.mktemp(name)
        hf.save_pretrained(d)
        out[name] = (hf, d)
    return out


def _prompt(n=9, seed=1):
    return torch.randint(3, V, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.inference_mode()
def test_each_step_equals_the_module_path(checkpoints, name, dtype):
    model = evolm.load_model(checkpoints[name][1], dtype=dtype)
    ids = _prompt()
    t = ids.shape[1]
    ref_cache, cache = model.new_cache(1, 32), model.new_cache(1, 32)
    positions = torch.arange(t)[None]
    token = int(prefill(model, ids, ref_cache, None, positions).argmax())
    prefill(model, ids, cache, None, positions)
    assert unsupported(model, cache) is None
    step = native_step(model, cache)
    for i in range(12):
        pos = t + i
        ref = decode_one_token(model, torch.tensor([[token]]), ref_cache, None, torch.tensor([[pos]]))
        logits, best, finite = step(token, pos)
        assert logits.dtype == dtype and logits.shape == ref.shape
        assert relative_error(logits, ref) <= (1e-5 if dtype == torch.float32 else 2e-2), (name, i)
        assert int(best) == int(logits.argmax()) and bool(finite)
        token = int(ref.argmax())
    for mine, theirs in zip(cache, ref_cache, strict=True):
        assert mine.length == theirs.length == t + 12
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(mine.k[:, :, : t + 12], theirs.k[:, :, : t + 12], rtol=tol, atol=tol)
        torch.testing.assert_close(mine.v[:, :, : t + 12], theirs.v[:, :, : t + 12], rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_tokens_equal_transformers(checkpoints, name):
    hf, d = checkpoints[name]
    model = evolm.load_model(d)
    ids = _prompt(seed=2)
    ref = hf.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        assert unsupported(model, model.new_cache(1, 64)) is None
    assert torch.equal(generate(model, ids, 20), ref)
    assert torch.equal(generate(model, ids, 20, native=False), ref)


def test_seeded_sampling_equals_the_module_path(checkpoints):
    model = evolm.load_model(checkpoints["gqa"][1])
    ids = _prompt(seed=3)
    kw = dict(temperature=0.9, top_k=40, top_p=0.95, seed=7)
    assert torch.equal(generate(model, ids, 24, **kw), generate(model, ids, 24, native=False, **kw))


def test_a_conversation_continues_the_same_cache(checkpoints):
    """A second turn prefills (module path) after native steps filled the cache: same tokens as the
    module path throughout, so the cache's contents and length were kept right."""
    model = evolm.load_model(checkpoints["qwen2"][1])
    turns = [_prompt(seed=4), _prompt(n=5, seed=5)]
    outs = []
    for native in (True, False):
        cache = model.new_cache(1, 64)
        first = generate(model, turns[0], 8, cache=cache, native=native)
        outs.append((first, generate(model, turns[1], 8, cache=cache, native=native)))
        assert cache[0].length == turns[0].shape[1] + 7 + turns[1].shape[1] + 7  # the last token is not fed
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("threads", [1, 3])
def test_any_thread_count(checkpoints, threads):
    """One thread (no barrier waits) and more threads than key/value heads or cores give the same tokens."""
    model = evolm.load_model(checkpoints["mqa-tied-llama3"][1])
    ids = _prompt(seed=6)
    ref = generate(model, ids, 12, native=False)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(generate(model, ids, 12), ref)
    finally:
        torch.set_num_threads(before)


_SMALLER_TEAM = """
import sys, torch, evolm
from evolm.infer.generate import decode_one_token
from evolm.infer.native_step import native_step
from evolm.nn import decode_kernels
assert decode_kernels.available()
torch.set_num_threads(2)
model = evolm.load_model(sys.argv[1])
with torch.inference_mode():
    ref_cache, cache = model.new_cache(1, 8), model.new_cache(1, 8)
    ref = decode_one_token(model, torch.tensor([[3]]), ref_cache, None, torch.tensor([[0]]))
    logits, best, finite = native_step(model, cache)(3, 0)
assert bool(finite[0]) and int(best) == int(ref.argmax()), (bool(finite[0]), int(best), int(ref.argmax()))
assert ((logits - ref).abs().max() / ref.abs().max()).item() <= 1e-5
"""


def test_a_smaller_thread_team_than_asked(checkpoints):
    """OpenMP may give the step's region fewer threads than torch.get_num_threads() (a nested region,
    OMP_THREAD_LIMIT): the step combines the threads it got, not the ones it asked for."""
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _SMALLER_TEAM, str(checkpoints["gqa"][1])], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]


def test_what_it_does_not_cover_keeps_the_module_path(checkpoints, tmp_path):
    model = evolm.load_model(checkpoints["gqa"][1])
    assert "gradients" in unsupported(model, model.new_cache(1, 32))  # parameters that train
    with torch.no_grad():
        assert unsupported(model, model.new_cache(1, 32)) is None
        assert "batch 1" in unsupported(model, model.new_cache(2, 32))
        handle = model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda *a: None)
        assert "has hooks" in unsupported(model, model.new_cache(1, 32))
        handle.remove()
        assert unsupported(model, model.new_cache(1, 32)) is None

        lora = evolm.load_model(checkpoints["gqa"][1])
        apply_lora(lora, LoRAConfig(rank=4, targets=("q_proj", "v_proj")))
        assert "replaced" in unsupported(lora, lora.new_cache(1, 32))

    hf = build_hf(T.MistralConfig(**SMALL, sliding_window=5))
    hf.save_pretrained(tmp_path / "window")
    windowed = evolm.load_model(tmp_path / "window")
    with torch.no_grad():
        assert "sliding-window" in unsupported(windowed, windowed.new_cache(1, 32))
    ids = _prompt(seed=8)
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(windowed, ids, 12), ref)  # the module path, past the window


@torch.inference_mode()
def test_a_step_out_of_place_is_refused(checkpoints):
    model = evolm.load_model(checkpoints["gqa"][1])
    cache = model.new_cache(1, 10)
    prefill(model, _prompt(), cache, None, torch.arange(9)[None])
    step = native_step(model, cache)
    with pytest.raises(ValueError, match="position 5, but the cache holds 9 tokens"):
        step(3, 5)
    step(3, 9)
    with pytest.raises(ValueError, match="overflow: 10 cached"):
        step(3, 10)
    with pytest.raises(ValueError, match="overflow: 10 cached \\+ 2 new tokens"):
        step.greedy(3, 10, 2, [])
    assert cache[0].length == 10


def test_one_call_greedy_decoding_stops_like_the_stream(checkpoints):
    """generate() runs greedy native steps in one call (DecodePlan.greedy); it stops at an EOS id as
    generate_stream's step-by-step path and the module path do."""
    model = evolm.load_model(checkpoints["gqa"][1])
    ids = _prompt(seed=9)
    free = generate(model, ids, 16, native=False)[0, ids.shape[1] :].tolist()
    eos = free[5]  # a token the model produces at step 6 (or earlier, if it repeats)
    stop = free.index(eos) + 1
    out = generate(model, ids, 16, eos_token_id=eos)
    assert out[0, ids.shape[1] :].tolist() == free[:stop]
    streamed = torch.stack(list(generate_stream(model, ids, 16, eos_token_id=eos)), dim=1)
    assert torch.equal(streamed, out[:, ids.shape[1] :])
    assert torch.equal(generate(model, ids, 16, eos_token_id=eos, native=False), out)


def test_unsupported_names_every_other_family(tmp_path):
    """Families outside the covered shape get a reason (and so the module path), never an exception."""
    configs = {
        "latent": T.DeepseekV3Config(
            vocab_size=V,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            max_position_embeddings=64,
        ),
        "unit_offset": T.GemmaConfig(**SMALL, head_dim=16),
        "qk_norm": T.Qwen3Config(**SMALL, head_dim=16),
        "learned_positions": T.GPT2Config(
            vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=None, eos_token_id=None
        ),
    }
    for name, cfg in configs.items():
        build_hf(cfg).save_pretrained(tmp_path / name)
        model = evolm.load_model(tmp_path / name)
        with torch.no_grad():
            reason = unsupported(model, model.new_cache(1, 16))
        assert isinstance(reason, str) and reason, name
