"""Shared harness for encoder-decoder families: evolm vs transformers on tiny random checkpoints.

``assert_seq2seq_parity(model_cls, hf_config, tmp_path)`` builds the transformers model with
perturbed random weights, saves it, loads it with evolm and compares the encoder output and the
decoder logits (fp32, a padded source row included); then saves with evolm, reloads with
transformers and compares again. ``assert_cached_decoding_equals_full`` checks that decoding one
token at a time over the cross-attention and self-attention caches gives the full forward's logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

import evolm
from helpers.hf_parity import TOL, relative_error


def build_hf_seq2seq(model_cls, hf_config, seed: int = 0, scale: float = 0.05):
    """A transformers seq2seq model for ``hf_config`` with perturbed random fp32 weights, eval mode."""
    torch.manual_seed(seed)
    model = model_cls(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
        for b in model.buffers():  # BART's final_logits_bias
            if b.is_floating_point():
                b.add_(torch.randn_like(b) * scale)
    return model


def source_and_target(vocab_size: int, seed: int = 1, src_len: int = 11, tgt_len: int = 9):
    """Two source rows (the second right-padded), their mask and decoder inputs."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (2, src_len), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, src_len - 4 :] = 0
    dec = torch.randint(0, vocab_size, (2, tgt_len), generator=gen)
    return ids, mask, dec


def assert_seq2seq_parity(model_cls, hf_config, tmp_path: Path, seed: int = 0):
    """Load a random HF seq2seq model with evolm, compare encoder states and logits both ways.

    Returns:
        ``(hf_model, evolm_model)``.
    """
    hf = build_hf_seq2seq(model_cls, hf_config, seed)
    hf.save_pretrained(tmp_path / "hf")
    model = evolm.load_model(tmp_path / "hf")
    ids, mask, dec = source_and_target(hf_config.vocab_size, seed + 1)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        enc = model.encode(ids, mask)
        out = model(ids, decoder_input_ids=dec, attention_mask=mask)
    for name, got, want in (("encoder output", enc, ref.encoder_last_hidden_state), ("logits", out, ref.logits)):
        assert got.shape == want.shape, name
        err = relative_error(got[0], want[0])
        assert err <= TOL, f"evolm vs transformers {name}: relative error {err:.2e} > {TOL}"
        err = relative_error(got[1, :7], want[1, :7]) if name == "encoder output" else relative_error(got, want)
        assert err <= TOL, f"evolm vs transformers {name} (padded row): relative error {err:.2e} > {TOL}"

    evolm.save_model(model, tmp_path / "evolm")
    back = model_cls.from_pretrained(tmp_path / "evolm", dtype=torch.float32).eval()
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    err = relative_error(again, ref.logits)
    assert err <= TOL, f"saved by evolm, reloaded by transformers: relative error {err:.2e} > {TOL}"
    return hf, model


def assert_cached_decoding_equals_full(model, prefix: int = 3) -> None:
    """Prefill ``prefix`` target tokens, then decode the rest one at a time over the caches."""
    ids, mask, dec = source_and_target(model.cfg.vocab_size, seed=5)
    with torch.no_grad():
        full = model(ids, decoder_input_ids=dec, attention_mask=mask)
        memory = model.encode(ids, mask)
        cache = model.new_decoder_cache(memory, mask, max_len=dec.shape[1])
        steps = [model(decoder_input_ids=dec[:, :prefix], cache=cache)]
        for t in range(prefix, dec.shape[1]):
            steps.append(model(decoder_input_ids=dec[:, t : t + 1], cache=cache))
    err = relative_error(torch.cat(steps, dim=1), full)
    assert err <= TOL, f"cached vs full decoder logits: relative error {err:.2e} > {TOL}"
