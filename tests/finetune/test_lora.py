"""LoRA / rsLoRA / DoRA as a module transform: closed forms, merge == unmerged, only adapters train,
and PEFT interoperability both ways on the transformers model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from evolm.errors import ConfigError
from evolm.models.adapters import load_adapter, save_adapter
from evolm.nn.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    lora_state_dict,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from finetune.util import randomize_adapters


def _ids(n: int = 2, t: int = 11, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


def test_config_splits_targets_and_validates():
    assert LoRAConfig(targets=("q_proj,v_proj",)).targets == ("q_proj", "v_proj")
    assert LoRAConfig(rank=4, alpha=8).scaling == 2.0
    assert LoRAConfig(rank=4, alpha=8, rslora=True).scaling == 4.0  # alpha / sqrt(r)
    with pytest.raises(ConfigError, match="lora.rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="lora.dropout"):
        LoRAConfig(dropout=1.0)


@pytest.mark.parametrize("dora", [False, True])
def test_layer_matches_closed_form(dora):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoRALinear(base, LoRAConfig(rank=3, alpha=5, dropout=0.0, dora=dora))
    assert torch.equal(layer(torch.ones(2, 12)), base(torch.ones(2, 12)))  # B = 0: starts as the base
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        if dora:
            layer.lora_magnitude_vector.mul_(torch.rand(7) + 0.5)
    x = torch.randn(4, 5, 12)
    w = base.weight + (5 / 3) * layer.lora_B.weight @ layer.lora_A.weight
    if dora:
        w = layer.lora_magnitude_vector[:, None] * w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ w.T + base.bias, rtol=1e-5, atol=1e-5)


def test_only_adapters_get_gradients_and_base_is_untouched(tiny_pair):
    _, model = tiny_pair
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_lora(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj"), dora=True))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and len(trainable) == 12
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        logits = model(_ids())
        logits.float().logsumexp(-1).mean().backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        # step 0: B = 0, so A's gradient B^T (...) is zero too; from step 1 on every adapter tensor has one
        nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert nonzero == (trainable if step else {n for n in trainable if "lora_A" not in n})
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for k, v in before.items():  # renamed under base_layer where wrapped; bit-identical
        key = k.replace("q_proj.", "q_proj.base_layer.").replace("v_proj.", "v_proj.base_layer.")
        assert torch.equal(after[key], v), key


@pytest.mark.parametrize(
    "cfg",
    [
        LoRAConfig(rank=4, alpha=8, targets=("all-linear",)),
        LoRAConfig(rank=4, alpha=8, targets=("q_proj", "down_proj"), rslora=True),
        LoRAConfig(rank=4, alpha=8, targets=("k_proj", "o_proj", "gate_proj"), dora=True),
    ],
    ids=["lora", "rslora", "dora"],
)
def test_merged_equals_unmerged(tiny_pair, cfg):
    _, model = tiny_pair
    apply_lora(model, cfg)
    randomize_adapters(model, scale=0.2)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
        merge_lora(model)
        merged = model(ids)
        unmerge_lora(model)
        again = model(ids)
    torch.testing.assert_close(merged, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, ref, rtol=0, atol=1e-5)


def test_unload_merged_saves_a_plain_model(tiny_pair, tmp_path):
    import evolm

    _, model = tiny_pair
    apply_lora(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj"), dora=True))
    randomize_adapters(model)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
    unload_lora(model, merge=True)
    assert not any("lora" in k or "base_layer" in k for k in model.state_dict())
    evolm.save_model(model, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(evolm.load_model(tmp_path / "merged")(ids), ref, rtol=0, atol=1e-5)


def test_targets_that_match_nothing_name_the_layers(tiny_pair):
    with pytest.raises(ConfigError, match="q_proj"):
        apply_lora(tiny_pair[1], LoRAConfig(targets=("qkv",)))


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_evolm_adapter_loads_in_peft(tiny_pair, tmp_path, dora, rslora):
    import peft

    hf, model = tiny_pair
    apply_lora(
        model,
        LoRAConfig(rank=4, alpha=16, dropout=0.1, targets=("q_proj", "v_proj", "up_proj"), dora=dora, rslora=rslora),
    )
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "up_proj", "v_proj"] and config["use_dora"] is dora
    wrapped = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = _ids()
    with torch.no_grad():
        ref = wrapped(ids).logits
        out = model(ids)
        with wrapped.disable_adapter():
            base = wrapped(ids).logits
    assert (ref - base).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_loads_in_evolm(tiny_pair, tmp_path, dora):
    import peft

    hf, model = tiny_pair
    ids = _ids()
    with torch.no_grad():
        base = hf(ids).logits
    cfg = peft.LoraConfig(r=8, lora_alpha=4, target_modules=["k_proj", "o_proj", "down_proj"], use_dora=dora)
    wrapped = peft.get_peft_model(hf, cfg)
    randomize_adapters(wrapped, seed=3)
    wrapped.save_pretrained(tmp_path / "peft")
    wrapped.eval()
    names = load_adapter(model, tmp_path / "peft")
    assert len(names) == 6 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    with torch.no_grad():
        ref = wrapped(ids).logits
        out = model(ids)
    assert (ref - base).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert math.isclose(model.get_submodule(names[0]).scaling, 0.5)
