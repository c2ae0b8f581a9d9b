"""A tiny random Llama checkpoint shared by the finetuning tests: the same weights as a
transformers model and as an evolm model, so adapters can be compared across the two."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import evolm
from finetune.util import tiny_hf_config


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved random Llama (C=64, 2 layers, V=256) with perturbed weights (norms not all ones)."""
    from helpers.hf_parity import build_hf

    out = tmp_path_factory.mktemp("finetune") / "tiny-llama"
    build_hf(tiny_hf_config(), seed=0).save_pretrained(out)
    return out


@pytest.fixture
def tiny_pair(tiny_llama_dir):
    """Fresh (transformers model, evolm model) with identical fp32 weights, eval mode."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return hf, evolm.load_model(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory, smollm2_gguf) -> Path:
    """A random 2-layer Llama (C=64) over SmolLM2's vocabulary, saved with SmolLM2's tokenizer and
    chat template, so the SFT recipe runs on it end to end in seconds."""
    from evolm.train.sft import save_tokenizer
    from helpers.hf_parity import build_hf

    out = tmp_path_factory.mktemp("finetune") / "tiny-chat"
    tok = evolm.load_tokenizer(smollm2_gguf)
    build_hf(tiny_hf_config(vocab_size=tok.vocab_size, max_position_embeddings=256), seed=1).save_pretrained(out)
    save_tokenizer(tok, out)
    return out


@pytest.fixture(scope="session")
def signature_jsonl(tmp_path_factory) -> Path:
    """14 HumanEval problems as prompt/completion records (``def`` line -> solution), one per line."""
    import json

    from finetune.util import humaneval_signature_records

    path = tmp_path_factory.mktemp("finetune") / "signatures.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in humaneval_signature_records(14)))
    return path
