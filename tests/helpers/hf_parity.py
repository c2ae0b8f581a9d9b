"""Shared harness: evolm vs Hugging Face transformers on a tiny random checkpoint.

``assert_parity(hf_config, tmp_path)`` builds the transformers model for ``hf_config`` with random
weights, perturbs every parameter (so default-initialised norms and zero biases cannot hide a
mapping mistake), saves it, loads it with evolm, and compares fp32 logits; then saves with evolm,
reloads with transformers and compares again. Returns both models for further checks.
"""

from __future__ import annotations

from pathlib import Path

import torch

import evolm

TOL = 1e-4  # max |evolm - hf| / max |hf|


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def build_hf(hf_config, seed: int = 0):
    """A transformers causal LM for ``hf_config`` with perturbed random fp32 weights, eval mode."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def assert_parity(hf_config, tmp_path: Path, seq_len: int = 13, batch: int = 2, seed: int = 0):
    """Load a random HF model with evolm, compare logits both ways; returns (hf_model, evolm_model, ids)."""
    import transformers

    hf = build_hf(hf_config, seed)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    model = evolm.load_model(src)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, hf_config.vocab_size, (batch, seq_len), generator=gen)
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert out.shape == ref.shape
    err = relative_error(out, ref)
    assert err <= TOL, f"evolm vs transformers logits: relative error {err:.2e} > {TOL}"

    dst = tmp_path / "evolm"
    evolm.save_model(model, dst)
    back = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    with torch.no_grad():
        again = back(ids).logits
    err = relative_error(again, ref)
    assert err <= TOL, f"saved by evolm, reloaded by transformers: relative error {err:.2e} > {TOL}"
    return hf, model, ids


def assert_cached_equals_full(model, ids: torch.Tensor, prefix: int = 5) -> None:
    """Prefill ``prefix`` tokens then decode the rest one at a time: logits equal a full forward."""
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(ids.shape[0], ids.shape[1])
        steps = [model(ids[:, :prefix], cache=cache)]
        for t in range(prefix, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], cache=cache))
    inc = torch.cat(steps, dim=1)
    err = relative_error(inc, full)
    assert err <= TOL, f"cached vs full logits: relative error {err:.2e} > {TOL}"
