"""``evolm train sft`` end to end: a tiny model over SmolLM2's tokenizer (LoRA, DoRA, QLoRA, merge,
gradient checkpointing, PEFT reading the run's adapter), and a short LoRA run on the real
SmolLM2-135M-Instruct whose validation loss must fall."""

from __future__ import annotations

import json

import torch

import evolm
from evolm.cli.main import main
from evolm.models.adapters import load_adapter
from evolm.nn.lora import LoRAConfig
from evolm.train.config import OptimConfig, ScheduleConfig
from evolm.train.sft import sft
from evolm.train.sft_config import SFTConfig


def _flags(model, data, out, *extra: str) -> list[str]:
    return [
        "train", "sft", str(model), "--data", str(data), "--out_dir", str(out),
        "--steps", "6", "--batch_size", "2", "--seq_len", "48", "--val_fraction", "0.25",
        "--progress", "false", "--sample_tokens", "4", "--optim.lr", "1e-2", "--eval_every", "0",
        "--lora.rank", "4", "--lora.targets", "q_proj,v_proj", *extra,
    ]  # fmt: skip


def test_cli_dora_merge_and_peft_reads_the_adapter(tiny_chat_model_dir, signature_jsonl, tmp_path):
    import peft
    import transformers

    out = tmp_path / "run"
    assert (
        main(_flags(tiny_chat_model_dir, signature_jsonl, out, "--lora.dora", "--merge", "--gradient_checkpointing"))
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6 and metrics[-1]["val_loss"] == summary["val_loss_after"]
    assert summary["lora_layers"] == 4 and summary["peak_rss_bytes"] > 0
    assert {"before", "after", "prompt"} <= set(json.loads((out / "samples.json").read_text()))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_chat_model_dir)

    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    model = evolm.load_model(tiny_chat_model_dir)
    load_adapter(model, out / "adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, dtype=torch.float32)
    wrapped = peft.PeftModel.from_pretrained(hf, out / "adapter").eval()
    merged = evolm.load_model(out / "merged")
    with torch.no_grad():
        ref = model(ids)
        torch.testing.assert_close(wrapped(ids).logits, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(ids), ref, rtol=0, atol=1e-5)
        assert (ref - evolm.load_model(tiny_chat_model_dir)(ids)).abs().max() > 1e-4  # training changed it
    assert evolm.load_tokenizer(out / "merged").chat_template


def test_cli_qlora_reports_storage(tiny_chat_model_dir, signature_jsonl, tmp_path):
    out = tmp_path / "qlora"
    assert main(_flags(tiny_chat_model_dir, signature_jsonl, out, "--qlora")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.5159 <= summary["nf4_bytes_per_param"] < 0.52  # 4.127 bits; small layers pay a little more
    # per layer: q, o 64x64; k, v 32x64; gate, up 128x64; down 64x128 (the head stays float32)
    assert summary["nf4_params"] == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)
    assert summary["val_loss_after"] < summary["val_loss_before"]


def test_smollm2_lora_lowers_validation_loss(signature_jsonl, tmp_path):
    """The real model, LoRA r=8 on q/v, 10 steps on 11 HumanEval one-liners; 3 held out."""
    cfg = SFTConfig(
        model=None,
        data=str(signature_jsonl),
        out_dir=str(tmp_path / "smollm2"),
        steps=10,
        batch_size=2,
        seq_len=64,
        val_fraction=0.2,
        eval_every=0,
        sample_tokens=0,
        progress=False,
        lora=LoRAConfig(rank=8, alpha=16, dropout=0.0, targets=("q_proj", "v_proj")),
        optim=OptimConfig(lr=2e-3, weight_decay=0.0),
        schedule=ScheduleConfig(warmup_steps=2),
    )
    summary = sft(cfg)
    assert summary["lora_layers"] == 60 and summary["trainable_params"] == 30 * 8 * (576 + 576 + 576 + 192)
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.1, summary
