"""Checkpoint loading and saving: round trips, sharding, and every bad input named clearly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import evolm
from evolm.errors import CheckpointError, ConfigError, UnsupportedModelError
from helpers.hf_parity import build_hf, relative_error

SMALL = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)


@pytest.fixture
def ckpt(tmp_path):
    """A tiny random Llama checkpoint directory saved by transformers."""
    model = build_hf(T.LlamaConfig(**SMALL))
    d = tmp_path / "llama"
    model.save_pretrained(d)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_unknown_model_type_lists_supported(ckpt):
    _edit_config(ckpt, model_type="transformer-xl-9000")
    with pytest.raises(UnsupportedModelError, match="transformer-xl-9000") as e:
        evolm.load_model(ckpt)
    assert "llama" in str(e.value) and "gpt2" in str(e.value)


def test_missing_path_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        evolm.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        evolm.load_model(tmp_path / "empty")


def test_pickle_checkpoints_are_refused_with_conversion_hint(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="safe_serialization=True"):
        evolm.load_model(ckpt)
    pt = tmp_path / "weights.pt"
    pt.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickle"):
        evolm.load_model(pt)


def test_truncated_safetensors_names_the_file(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors") as e:
        evolm.load_model(ckpt)
    assert "truncated" in str(e.value)


def test_shape_mismatch_names_tensor_expected_and_found(ckpt):
    _edit_config(ckpt, intermediate_size=64)
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight") as e:
        evolm.load_model(ckpt)
    assert "(48, 32)" in str(e.value) or "(32, 48)" in str(e.value)
    assert "(64, 32)" in str(e.value) or "(32, 64)" in str(e.value)


def test_vocab_mismatch_between_config_and_weights(ckpt):
    _edit_config(ckpt, vocab_size=120)
    with pytest.raises(CheckpointError, match="vocab_size") as e:
        evolm.load_model(ckpt)
    assert "embed_tokens" in str(e.value) or "lm_head" in str(e.value)


def test_missing_and_unexpected_tensors_are_named(ckpt):
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.layers.1.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        evolm.load_model(ckpt)
    assert "model.layers.1.self_attn.k_proj.weight" in str(e.value)
    assert "model.layers.1.self_attn.extra.weight" in str(e.value)


def test_invalid_config_value_names_field(ckpt):
    _edit_config(ckpt, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="n_kv_heads=3"):
        evolm.load_model(ckpt)
    _edit_config(ckpt, num_key_value_heads=2, num_hidden_layers=0)
    with pytest.raises(ConfigError, match="n_layers=0"):
        evolm.load_model(ckpt)


def test_sharded_round_trip_and_missing_shard(ckpt, tmp_path):
    model = evolm.load_model(ckpt)
    out = tmp_path / "sharded"
    written = evolm.save_model(model, out, max_shard_size=20_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json") in written
    ids = torch.randint(0, SMALL["vocab_size"], (1, 9))
    reloaded = evolm.load_model(out)
    hf = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(ids)
        assert torch.equal(reloaded(ids), ref)
        assert relative_error(hf(ids).logits, ref) < 1e-5
    shards[0].unlink()
    with pytest.raises(CheckpointError, match=shards[0].name):
        evolm.load_model(out)


def test_save_keeps_other_files_and_replaces_stale_shards(ckpt, tmp_path):
    model = evolm.load_model(ckpt)
    out = tmp_path / "out"
    evolm.save_model(model, out, max_shard_size=20_000)
    (out / "tokenizer.json").write_text("{}")
    evolm.save_model(model, out)  # now a single file: old shards and index must go
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not list(out.glob(".evolm-save-*"))


def test_dtype_and_meta_free_result(ckpt):
    model = evolm.load_model(ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert not model.training


def test_checkpoint_stays_in_its_dtype_by_default(tmp_path):
    hf = build_hf(T.LlamaConfig(**SMALL)).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    model = evolm.load_model(tmp_path / "bf16")
    assert model.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loaded_weights_are_not_pages_of_the_checkpoint_file(ckpt):
    """Same-dtype tensors are copied off the safetensors mmap: file-backed pages read at about half
    the bandwidth of anonymous memory in decode steps here, and the file may be replaced later."""
    model = evolm.load_model(ckpt)
    file = str((ckpt / "model.safetensors").resolve())
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].strip() == file:
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((lo, hi))
    backed = [n for n, p in model.named_parameters() if any(lo <= p.data_ptr() < hi for lo, hi in ranges)]
    assert backed == []
    assert model.lm_head.weight.dtype == torch.float32  # the checkpoint's own dtype: no conversion copied it


def test_tokenizer_vocab_larger_than_model_is_rejected(ckpt, tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(200)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(ckpt / "tokenizer.json"))
    model = evolm.load_model(ckpt)
    with pytest.raises(CheckpointError, match="200 tokens") as e:
        evolm.load_tokenizer(ckpt, model=model)
    assert "vocab_size is 97" in str(e.value)


def test_package_imports_and_runs_without_transformers(ckpt):
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["transformers"] = None  # any import of it now fails
        import torch, evolm
        m = evolm.load_model({str(ckpt)!r})
        print(tuple(m(torch.tensor([[1, 2, 3]])).shape))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "(1, 3, 97)" in r.stdout


def test_copy_of_directory_loads_identically(ckpt, tmp_path):
    shutil.copytree(ckpt, tmp_path / "copy")
    a, b = evolm.load_model(ckpt), evolm.load_model(tmp_path / "copy")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
