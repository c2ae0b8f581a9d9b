"""The GGUF key/value reader behind `read_gguf_vocab`, and the vocabularies it refuses.

The reader is checked against llama.cpp's own Python reader (`gguf.GGUFReader`) on real files
and on files written by `gguf.GGUFWriter` in both byte orders.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from evolm.errors import CheckpointError, UnsupportedModelError
from evolm.tokenizer.gguf_vocab import _read_metadata, read_gguf_vocab


def reference_metadata(path: Path) -> dict:
    """Every key as `gguf.GGUFReader` reads it, without its header pseudo-keys."""
    reader = gguf.GGUFReader(path)
    return {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}


def write_vocab(path: Path, endian: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE, **keys) -> Path:
    """A tokenizer-only GGUF; `keys` override the defaults (a tiny byte-level BPE)."""
    meta = {
        "model": "gpt2",
        "pre": "gpt-2",
        "tokens": ["<|end|>", "a", "b", "ab", "Ġ", "Ġab"],
        "types": [3, 1, 1, 1, 1, 1],
        "merges": ["a b", "Ġ ab"],
        "bos": 0,
        "eos": 0,
    } | keys
    writer = gguf.GGUFWriter(path, "llama", endianess=endian)
    writer.add_tokenizer_model(meta["model"])
    if meta["pre"] is not None:
        writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    if meta["merges"] is not None:
        writer.add_token_merges(meta["merges"])
    if meta.get("scores") is not None:
        writer.add_token_scores(meta["scores"])
    for key in ("bos", "eos"):
        if meta[key] is not None:
            getattr(writer, f"add_{key}_token_id")(meta[key])
    writer.add_float32("test.scale", 0.5)
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("name", ["llama-spm", "bert-bge"])
def test_metadata_equals_gguf_reader_on_real_files(name, llama_cpp_vocab):
    path = llama_cpp_vocab(name)
    assert _read_metadata(path) == reference_metadata(path)


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG], ids=["little", "big"])
def test_metadata_in_both_byte_orders(tmp_path, endian):
    path = write_vocab(tmp_path / "v.gguf", endian)
    meta = _read_metadata(path)
    ref = reference_metadata(path)
    # GGUFReader.contents() flattens arrays of arrays; the values and their grouping are kept here
    assert meta.pop("test.nested") == [[1, 2], [3]] and ref.pop("test.nested") == [1, 2, 3]
    assert meta == ref and meta["tokenizer.ggml.token_type"] == [3, 1, 1, 1, 1, 1]
    tok = read_gguf_vocab(path).tokenizer
    assert tok.encode(" ab<|end|>").tokens == ["Ġab", "<|end|>"]


def test_truncated_metadata_names_the_file(tmp_path, llama_cpp_vocab):
    data = llama_cpp_vocab("llama-spm").read_bytes()
    for keep in (3, 20, 100, 1000, 200_000, 500_000):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=rf"cut{keep}\.gguf"):
            read_gguf_vocab(cut)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf_vocab(write_bytes(tmp_path / "text.gguf", b"hello world, not a gguf file at all"))
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        read_gguf_vocab(tmp_path / "absent.gguf")


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_unsupported_tokenizer_models_are_named(tmp_path):
    for model in ("rwkv", "plamo2", "whitespace"):
        with pytest.raises(UnsupportedModelError, match=rf"'{model}'.*'gpt2', 'llama', 'gemma4', 'bert', 't5'"):
            read_gguf_vocab(write_vocab(tmp_path / f"{model}.gguf", model=model))


@pytest.mark.parametrize("pre", ["kimi-k2", "afmoe", "superbpe", "granite-embed-multi-97m", "no-such-pre"])
def test_unsupported_pre_tokenizers_are_named(tmp_path, pre):
    """llama.cpp runs custom code (kimi-k2, afmoe), zero-width splits (superbpe) or regexes
    emulated for its engine whose original is unknown here (granite-embed-multi-97m)."""
    with pytest.raises(UnsupportedModelError, match=rf"tokenizer\.ggml\.pre is '{pre}'; supported: .*'gpt-2'"):
        read_gguf_vocab(write_vocab(tmp_path / "v.gguf", pre=pre))


def test_missing_pre_is_llama_cpp_default(tmp_path):
    tok = read_gguf_vocab(write_vocab(tmp_path / "v.gguf", pre=None)).tokenizer
    # the default pre-tokenizer isolates punctuation runs before the GPT-2 split
    assert tok.pre_tokenizer.pre_tokenize_str("ab, ab")[:2] == [("ab", (0, 2)), (",", (2, 3))]


def test_bert_needs_an_unknown_token(tmp_path):
    path = write_vocab(tmp_path / "v.gguf", model="bert", pre=None, merges=None, tokens=["[CLS]", "▁a"], types=[3, 1])
    with pytest.raises(CheckpointError, match="unknown_token_id"):
        read_gguf_vocab(path)
