"""Token datasets on disk: exact round trip, dtype choice, meta, atomic writes, integrity checks, caching."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from evolm.data.corpus import DataError, iter_documents
from evolm.data.shards import (
    META_FILE,
    TOKENS_FILE,
    open_shards,
    prepare_shards,
    token_dtype,
    tokenizer_fingerprint,
    write_shards,
)
from evolm.tokenizer import Tokenizer

DOCS = [
    "def f(x):\n    return x + 1\n",
    "Ünïcödé — text, emoji 🐍 and\ttabs",
    "x",
    "class A:\n    pass\n" * 50,
]


def test_round_trip_decodes_to_documents_plus_eos(tmp_path: Path, bpe_tokenizer: Tokenizer) -> None:
    sh = write_shards(DOCS, bpe_tokenizer, tmp_path / "ds", source="unit", batch_chars=40)  # several batches
    eos = bpe_tokenizer.eos_token_id
    assert sh.n_docs == len(DOCS) and sh.eos_token_id == eos
    assert sh.tokens.dtype == np.dtype("<u2") and isinstance(sh.tokens, np.memmap)
    # the whole array decodes to the documents, each followed by EOS
    text = bpe_tokenizer.decode(sh.tokens.tolist())
    assert text == "".join(d + "<|endoftext|>" for d in DOCS)
    for i, doc in enumerate(DOCS):  # batch encoding == encode() one by one, then EOS
        assert sh.document(i).tolist() == [*bpe_tokenizer.encode(doc, add_special_tokens=False), eos]
    meta = json.loads((tmp_path / "ds" / META_FILE).read_text())
    assert meta["n_tokens"] == sh.n_tokens == int(sh.doc_lengths().sum())
    assert meta["n_docs"] == 4 and meta["vocab_size"] == bpe_tokenizer.vocab_size and meta["dtype"] == "<u2"
    assert meta["source"] == "unit" and meta["text_bytes"] == sum(len(d.encode()) for d in DOCS)
    assert meta["tokenizer_sha256"] == tokenizer_fingerprint(bpe_tokenizer)
    sh.verify()


def test_stdlib_slice_round_trip(tmp_path: Path, bpe_tokenizer: Tokenizer) -> None:
    docs = [d for _, d in zip(range(60), iter_documents(["stdlib"]), strict=False)]
    sh = write_shards(docs, bpe_tokenizer, tmp_path / "std")
    for i in (0, 17, 59):
        assert bpe_tokenizer.decode(sh.document(i)[:-1].tolist()) == docs[i]
    # the same input gives the same bytes and hash
    again = write_shards(docs, bpe_tokenizer, tmp_path / "std2", batch_chars=1 << 30)
    assert again.meta["sha256"] == sh.meta["sha256"]
    assert (tmp_path / "std" / TOKENS_FILE).read_bytes() == (tmp_path / "std2" / TOKENS_FILE).read_bytes()


def test_dtype_widens_past_65536_ids(tmp_path: Path, make_word_tokenizer: Callable) -> None:
    assert token_dtype(65536) == np.dtype("<u2") and token_dtype(65537) == np.dtype("<u4")
    tok = make_word_tokenizer(70_000, eos=True)
    docs = ["w69999 w3 w65536", "w65535 w0"]
    sh = write_shards(docs, tok, tmp_path / "wide")
    assert sh.tokens.dtype == np.dtype("<u4")
    assert sh.tokens.tolist() == [69999, 3, 65536, 70_000, 65535, 0, 70_000]
    assert sh.offsets.tolist() == [0, 4, 7]


def test_no_eos_tokenizer_appends_nothing(tmp_path: Path, word_tokenizer: Tokenizer) -> None:
    sh = write_shards(["w1 w2", "w3"], word_tokenizer, tmp_path / "d")
    assert sh.tokens.tolist() == [1, 2, 3] and sh.eos_token_id is None


def test_write_is_atomic(tmp_path: Path, word_tokenizer: Tokenizer) -> None:
    def docs() -> Iterator[str]:
        yield "w1 w2"
        raise RuntimeError("source failed midway")

    with pytest.raises(RuntimeError, match="midway"):
        write_shards(docs(), word_tokenizer, tmp_path / "ds", batch_chars=1)
    assert os.listdir(tmp_path) == []  # neither the dataset nor its temporary folder
    with pytest.raises(DataError, match="no documents"):
        write_shards([], word_tokenizer, tmp_path / "ds")
    assert os.listdir(tmp_path) == []
    write_shards(["w1"], word_tokenizer, tmp_path / "ds")
    with pytest.raises(DataError, match="already exists"):
        write_shards(["w2"], word_tokenizer, tmp_path / "ds")
    assert write_shards(["w2"], word_tokenizer, tmp_path / "ds", overwrite=True).tokens.tolist() == [2]
    assert os.listdir(tmp_path) == ["ds"]


def test_open_detects_damage(tmp_path: Path, word_tokenizer: Tokenizer) -> None:
    with pytest.raises(DataError, match="no meta.json"):
        open_shards(tmp_path)
    write_shards(["w1 w2 w3", "w4"], word_tokenizer, tmp_path / "ds")
    tokens = tmp_path / "ds" / TOKENS_FILE
    data = tokens.read_bytes()
    tokens.write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"6 bytes, expected n_tokens \* itemsize = 4 \* 2"):
        open_shards(tmp_path / "ds")
    tokens.write_bytes(data[:-2] + b"\x09\x00")  # same size, one token changed
    with pytest.raises(DataError, match="content hash"):
        open_shards(tmp_path / "ds").verify()


def test_prepare_caches_by_sources_and_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, word_tokenizer: Tokenizer, make_word_tokenizer: Callable
) -> None:
    monkeypatch.setenv("EVOLM_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "a.txt"
    src.write_text("w1 w2")
    first = prepare_shards([str(src)], word_tokenizer)
    assert first.path.parent == tmp_path / "cache" / "datasets"
    assert first.meta["corpus"] == {"documents": 1, "empty": 0, "bad_lines": 0, "text_bytes": 5}
    assert prepare_shards([str(src)], word_tokenizer).path == first.path  # reused
    src.write_text("w3 w4 w5")
    os.utime(src, ns=(1, 1))  # a changed file is a different dataset
    second = prepare_shards([str(src)], word_tokenizer)
    assert second.path != first.path and second.tokens.tolist() == [3, 4, 5]
    other = make_word_tokenizer(10, eos=True)
    assert prepare_shards([str(src)], other).path not in (first.path, second.path)
    with pytest.raises(DataError, match="holds a dataset of"):
        prepare_shards([str(src)], other, out_dir=second.path)
