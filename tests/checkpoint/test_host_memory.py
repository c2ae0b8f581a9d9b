"""Loaded CPU weights in huge-page blocks, one per layer (evolm.checkpoint.host_memory), and what
must keep working with them: parity, saving, and QLoRA freeing the full-precision copies."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import transformers as T

import evolm
from evolm.checkpoint import host_memory
from evolm.nn.nf4 import quantize_linears

CFG = dict(
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=512,
    vocab_size=5000,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    hf = T.LlamaForCausalLM(T.LlamaConfig(**CFG)).eval()
    hf.save_pretrained(d)
    return d, hf


def test_pack_copies_in_order_into_one_aligned_block():
    ts = [torch.randn(3, 5), torch.randn(7), torch.randn(2, 2, 2)]
    out = host_memory.pack(ts, torch.bfloat16)
    assert [o.shape for o in out] == [t.shape for t in ts] and all(o.dtype == torch.bfloat16 for o in out)
    for o, t in zip(out, ts, strict=True):
        assert torch.equal(o, t.bfloat16()) and o.is_contiguous()
    assert len({o.untyped_storage().data_ptr() for o in out}) == 1
    starts = [o.data_ptr() for o in out]
    assert starts[0] % host_memory.HUGE_PAGE == 0 and starts == sorted(starts)
    assert all(s % 64 == 0 for s in starts)


def test_layer_weights_share_a_block_in_call_order(checkpoint):
    d, hf = checkpoint
    model = evolm.load_model(d)
    ids = torch.randint(0, CFG["vocab_size"], (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        ws = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
        ptrs = [lin.weight.data_ptr() for lin in ws]
        assert len({lin.weight.untyped_storage().data_ptr() for lin in ws}) == 1 and ptrs == sorted(ptrs)
        assert layer.input_layernorm.weight.untyped_storage().nbytes() == CFG["hidden_size"] * 4  # norms apart
    emb = model.model.embed_tokens.weight  # 5.1 MB: a block of its own
    assert emb.data_ptr() % host_memory.HUGE_PAGE == 0


def test_packed_model_saves_and_transformers_loads_it(checkpoint, tmp_path):
    d, hf = checkpoint
    evolm.save_model(evolm.load_model(d), tmp_path)
    back = T.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, CFG["vocab_size"], (1, 7))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)


def test_qlora_quantisation_frees_the_layer_blocks(checkpoint):
    d, _ = checkpoint
    model = evolm.load_model(d)
    block = weakref.ref(model.model.layers[0].self_attn.q_proj.weight.untyped_storage())
    assert block() is not None
    quantize_linears(model)
    gc.collect()
    assert block() is None  # no norm or embedding keeps the float32 layer weights alive
