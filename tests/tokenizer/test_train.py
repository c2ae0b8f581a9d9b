"""Tokenizer training: byte-level BPE and Unigram with the `tokenizers` library, the teaching BPE.

The corpus is the Python standard library's own source, which every Python installation has:
the top-level `*.py` files of `sysconfig.get_paths()["stdlib"]` in sorted order, the first ones
up to a byte budget for training and the last two (never trained on) as held-out text. Its
content differs between Python versions; every assertion compares two tokenizers trained on the
same files, or checks a property, so none depends on the version.

Reference behaviour is transformers: a trained tokenizer saved with `save_tokenizer` must load in
`AutoTokenizer` and `PreTrainedTokenizerFast` and give the same ids as `evolm.load_tokenizer`.
"""

from __future__ import annotations

import dataclasses
import json
import sysconfig
from functools import cache
from pathlib import Path

import pytest
import tokenizers
from tokenizers import pre_tokenizers

import evolm
from evolm.errors import ConfigError
from evolm.tokenizer import bpe_teaching
from evolm.tokenizer.train import (
    TokenizerTrainConfig,
    iter_text_files,
    save_tokenizer,
    train_from_config,
    train_tokenizer,
)

VARIED = [
    "Hello, world! It's 2024; we're testing tokenizers.",
    "ünïcödé façade — naïve café, Ærøskøbing, Straße",
    "emoji 😀🎉 family 👨\u200d👩\u200d👧 flags 🇫🇷 keycap 1️⃣",
    "中文字符 日本語のテキスト 한국어 텍스트 Ελληνικά русский עברית العربية हिन्दी",
    'def f(x: int) -> int:\n    """Square."""\n    return x ** 2  # comment\n\n\tif x:\n\t\tpass\n',
    "tabs\tand\r\nCRLF and  double  spaces and trailing   ",
    "numbers 3.14159 1e-10 0xDEADBEEF 1_000_000 ½ ²",
    "<0x41> looks like a byte piece; <unk> and <s> are tokens here",
    "ends with <|endoftext|> the special token",
    "zero\u200bwidth\u00a0nbsp\ufeffbom",
    "",
]


@cache
def stdlib_files() -> tuple[Path, ...]:
    """The top-level `*.py` files of the running Python's standard library, sorted by name."""
    files = tuple(sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")))
    assert len(files) > 50, f"expected the Python standard library's sources next to {sysconfig.get_paths()}"
    return files


def read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


@cache
def stdlib_corpus(max_bytes: int) -> tuple[str, ...]:
    """Sorted stdlib files (the last two excluded), whole, each one that still fits in `max_bytes`."""
    docs, total = [], 0
    for path in stdlib_files()[:-2]:
        text = read(path)
        size = len(text.encode("utf-8"))
        if total + size <= max_bytes:
            docs.append(text)
            total += size
    return tuple(docs)


@cache
def held_out() -> tuple[str, ...]:
    """The last two stdlib files (never in a training corpus) and the varied strings."""
    return (*(read(p) for p in stdlib_files()[-2:]), *VARIED)


def library_bpe(docs: list[str], vocab_size: int, min_frequency: int = 1) -> evolm.Tokenizer:
    """The library's byte-level BPE with no special tokens, as `bpe_teaching.train_bpe` trains by default."""
    return train_tokenizer(
        docs, "bpe", vocab_size, special_tokens=[], bos_token="", eos_token="", min_frequency=min_frequency
    )


def library_merges(backend: tokenizers.Tokenizer) -> list[tuple[str, str]]:
    """The BPE merges of a `tokenizers.Tokenizer`, in rank order."""
    merges = json.loads(backend.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


@pytest.fixture(scope="module")
def bpe() -> evolm.Tokenizer:
    """Byte-level BPE, 2000 tokens, trained on ~1 MB of the standard library."""
    return train_tokenizer(stdlib_corpus(1_000_000), "bpe", vocab_size=2000)


@pytest.fixture(scope="module")
def unigram() -> evolm.Tokenizer:
    """Unigram with byte fallback, 1000 tokens, trained on ~200 kB of the standard library."""
    return train_tokenizer(stdlib_corpus(200_000), "unigram", vocab_size=1000)


def assert_transformers_agrees(tok: evolm.Tokenizer, directory: Path, texts: list[str], unk_id: int | None) -> None:
    """Save `tok`; evolm and transformers (two ways) load it and give the same ids, text and special ids."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    save_tokenizer(tok, directory)
    assert {p.name for p in directory.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    ours = evolm.load_tokenizer(directory)
    auto = AutoTokenizer.from_pretrained(directory)
    fast = PreTrainedTokenizerFast.from_pretrained(directory)
    special_ids = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == special_ids
    assert ours.add_bos == tok.add_bos
    for hf in (auto, fast):
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (*special_ids, unk_id)
        assert len(hf) == ours.vocab_size == tok.vocab_size
    for text in texts:
        ids = ours.encode(text)
        assert ids == tok.encode(text), text
        assert auto.encode(text) == ids, text
        assert fast(text)["input_ids"] == ids, text
        plain = ours.encode(text, add_special_tokens=False)
        assert auto.encode(text, add_special_tokens=False) == plain, text
        assert auto.decode(plain) == ours.decode(plain), text
        assert auto.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True), text


# --- byte-level BPE --------------------------------------------------------------------------


def test_bpe_vocabulary_layout(bpe):
    vocab = bpe.backend.get_vocab()
    assert bpe.vocab_size == len(vocab) == 2000
    assert vocab["<|endoftext|>"] == 0 == bpe.bos_token_id == bpe.eos_token_id
    assert bpe.pad_token_id is None and not bpe.add_bos
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    assert set(alphabet) <= set(vocab), "all 256 bytes are tokens, seen in the corpus or not"
    assert sorted(vocab[c] for c in alphabet) == list(range(1, 257))
    assert len(library_merges(bpe.backend)) == 2000 - 257


def test_bpe_round_trips_any_text_exactly(bpe):
    for text in held_out():
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
    # The special token inside text is recognised as one id; without it no id is special.
    assert bpe.encode("a<|endoftext|>b").count(0) == 1
    code = held_out()[0]
    assert len(bpe.encode(code)) < len(code.encode("utf-8")) / 2.5, "merges compress held-out code"


def test_bpe_saved_loads_identically_in_evolm_and_transformers(bpe, tmp_path):
    assert_transformers_agrees(bpe, tmp_path / "bpe", list(held_out()), unk_id=None)


def test_bpe_with_pad_and_bos_loads_identically_in_transformers(tmp_path):
    tok = train_tokenizer(stdlib_corpus(100_000), "bpe", vocab_size=600, pad_token="<pad>", add_bos=True)
    assert tok.backend.get_vocab()["<pad>"] == 1 == tok.pad_token_id, "role tokens join the special tokens"
    assert tok.encode("x = 1")[0] == tok.bos_token_id == 0
    assert tok.encode("x = 1", add_special_tokens=False)[0] != 0
    assert_transformers_agrees(tok, tmp_path / "bpe-bos", list(VARIED), unk_id=None)


def test_bpe_nfkc_and_max_token_length(tmp_path):
    tok = train_tokenizer(stdlib_corpus(100_000), "bpe", vocab_size=800, normalization="nfkc", max_token_length=4)
    assert max(len(t) for t in tok.backend.get_vocab() if t != "<|endoftext|>") == 4
    assert tok.decode(tok.encode("ﬁne ＦＵＬＬ ½")) == "fine FULL 1⁄2"
    assert_transformers_agrees(tok, tmp_path / "bpe-nfkc", list(VARIED), unk_id=None)


# --- Unigram ---------------------------------------------------------------------------------


def test_unigram_vocabulary_layout(unigram):
    vocab = unigram.backend.get_vocab()
    assert unigram.vocab_size == len(vocab) == 1000
    assert [vocab[t] for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert (unigram.bos_token_id, unigram.eos_token_id, unigram.pad_token_id) == (1, 2, None)
    assert [vocab[f"<0x{b:02X}>"] for b in range(256)] == list(range(3, 259)), "SentencePiece's byte pieces"
    model = json.loads(unigram.backend.to_str())["model"]
    assert model["type"] == "Unigram" and model["byte_fallback"] and model["unk_id"] == 0
    assert "▁def" in vocab and "▁return" in vocab
    assert max(len(p) for p, _ in model["vocab"]) == 16, "SentencePiece's max_sentencepiece_length"


def test_unigram_byte_fallback_never_produces_unk(unigram):
    byte_ids = range(3, 259)
    for text in held_out():
        ids = unigram.encode(text.replace("<unk>", "<unk"), add_special_tokens=False)  # "<unk>" is the token
        assert 0 not in ids, text
    emoji = unigram.encode("😀", add_special_tokens=False)
    assert [unigram.backend.id_to_token(i) for i in emoji if i in byte_ids] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    # Literal text that looks like a byte piece is spelled with ordinary pieces.
    literal = unigram.encode("<0x41>", add_special_tokens=False)
    assert not set(literal) & set(byte_ids)
    assert unigram.decode(literal) == "<0x41>"


def test_unigram_round_trips_up_to_nfkc_and_leading_space(unigram):
    import unicodedata

    for text in held_out():
        expected = unicodedata.normalize("NFKC", text)
        expected = expected.removeprefix(" ")  # Metaspace's "▁" prefix stands for one leading space
        assert unigram.decode(unigram.encode(text, add_special_tokens=False)) == expected, text
    assert unigram.decode(unigram.encode("ﬁne ＦＵＬＬ"), skip_special_tokens=True) == "fine FULL"


def test_unigram_special_tokens_in_text(unigram):
    text = "x<s>y </s> <unk>z"
    ids = unigram.encode(text, add_special_tokens=False)
    assert [i for i in ids if i < 3] == [1, 2, 0]
    assert unigram.decode(ids) == text, "no '▁' is prepended after a special token"


def test_unigram_drops_learned_pieces_that_repeat_special_or_byte_tokens():
    # The library's trainer does not know the special tokens while it learns and keeps "<s>" as a piece too.
    tok = train_tokenizer(["ab<s>cd<0x41>ef <s> <0x41> " * 300], "unigram", vocab_size=330)
    pieces = [p for p, _ in json.loads(tok.backend.to_str())["model"]["vocab"]]
    assert len(pieces) == len(set(pieces)) == tok.vocab_size
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("<0x41>") == 3 + 0x41
    text = "ab<s>cd<0x41>ef"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_unigram_adds_bos_like_sentencepiece(unigram):
    ids = unigram.encode("import os")
    assert ids[0] == 1 and ids[1:] == unigram.encode("import os", add_special_tokens=False)


def test_unigram_saved_loads_identically_in_evolm_and_transformers(unigram, tmp_path):
    assert_transformers_agrees(unigram, tmp_path / "unigram", list(held_out()), unk_id=0)


def test_unigram_without_byte_fallback_uses_unk(tmp_path):
    tok = train_tokenizer(stdlib_corpus(60_000), "unigram", vocab_size=400, byte_fallback=False, add_bos=False)
    assert "<0x41>" not in tok.backend.get_vocab()
    ids = tok.encode("x 😀 y")
    assert 0 in ids
    assert tok.decode(ids, skip_special_tokens=True) == "x  y"
    assert_transformers_agrees(tok, tmp_path / "unigram-unk", list(VARIED), unk_id=0)


# --- the teaching BPE against the library ----------------------------------------------------


def test_gpt2_split_pattern_matches_the_regex_module():
    regex = pytest.importorskip("regex")
    for text in (*stdlib_corpus(200_000), *VARIED):
        expected = regex.findall(bpe_teaching.GPT2_SPLIT_PATTERN, text)
        assert bpe_teaching.pretokenize(text) == [
            "".join(bpe_teaching.BYTE_TO_CHAR[b] for b in piece.encode("utf-8")) for piece in expected
        ]


def test_bytes_to_unicode_is_the_library_alphabet():
    table = bpe_teaching.bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert table == bytes_to_unicode()


def test_teaching_bpe_learns_the_textbook_merges():
    # The worked example of the Hugging Face course: hug x10, pug x5, pun x12, bun x4, hugs x5.
    docs = ["hug"] * 10 + ["pug"] * 5 + ["pun"] * 12 + ["bun"] * 4 + ["hugs"] * 5
    taught = bpe_teaching.train_bpe(docs, vocab_size=256 + 3)
    assert taught.merges == [("u", "g"), ("u", "n"), ("h", "ug")]
    lib = library_bpe(docs, vocab_size=256 + 3)
    assert library_merges(lib.backend) == taught.merges
    id_to_token = {i: t for t, i in taught.vocab.items()}
    assert [id_to_token[i] for i in taught.encode("hugs")] == ["hug", "s"]
    assert taught.encode("hugs bun") == lib.encode("hugs bun")


def test_teaching_bpe_breaks_ties_by_token_id_like_the_library():
    # After ("a","a") -> "aa" (id 256), ("aa","x") and ("z","x") are both seen once. The library
    # takes the pair with the smaller ids: "z" (byte id) < "aa" (made later), although "aa" < "z"
    # as strings.
    docs = ["aa", "aa", "aa", "aax", "zx"]
    taught = bpe_teaching.train_bpe(docs, vocab_size=259)
    assert taught.merges == [("a", "a"), ("z", "x"), ("aa", "x")]
    lib = library_bpe(docs, vocab_size=259)
    assert library_merges(lib.backend) == taught.merges


def test_teaching_bpe_matches_the_library_on_the_stdlib(bpe):
    # Same corpus, size, special token and min_frequency as the `bpe` fixture.
    taught = bpe_teaching.train_bpe(stdlib_corpus(1_000_000), 2000, min_frequency=2, special_tokens=["<|endoftext|>"])
    assert library_merges(bpe.backend) == taught.merges, "every merge, in the same order"
    assert bpe.backend.get_vocab() == taught.vocab
    for text in held_out():
        if "<|endoftext|>" in text:  # the library splits special tokens out first; the teaching encoder does not
            continue
        ids = taught.encode(text)
        assert bpe.encode(text) == ids, text
        assert taught.decode(ids) == text


def test_teaching_bpe_respects_min_frequency():
    docs = ["ab ab ab cd"]
    taught = bpe_teaching.train_bpe(docs, vocab_size=400, min_frequency=3)
    lib = library_bpe(docs, vocab_size=400, min_frequency=3)
    # Pairs: ("a","b") x3, ("Ġ","a") x2, ("Ġ","c") x1, ("c","d") x1; then ("Ġ","ab") x2 < 3: stop.
    assert library_merges(lib.backend) == taught.merges == [("a", "b")]


# --- inputs and configuration ----------------------------------------------------------------


def test_files_and_strings_train_the_same_tokenizer():
    paths = stdlib_files()[:6]
    from_files = train_tokenizer(iter_text_files(paths), "bpe", vocab_size=500)
    from_strings = train_tokenizer([read(p) for p in paths], "bpe", vocab_size=500)
    assert from_files.backend.to_str() == from_strings.backend.to_str()


def test_config_defaults_follow_the_kind():
    bpe_cfg = TokenizerTrainConfig(kind="bpe", vocab_size=1000)
    assert bpe_cfg.special_tokens == ("<|endoftext|>",)
    assert (bpe_cfg.bos_token, bpe_cfg.eos_token, bpe_cfg.unk_token, bpe_cfg.pad_token) == (
        "<|endoftext|>",
        "<|endoftext|>",
        "",
        "",
    )
    assert (bpe_cfg.min_frequency, bpe_cfg.normalization, bpe_cfg.add_bos, bpe_cfg.max_token_length) == (
        2,
        "none",
        False,
        None,
    )
    uni = TokenizerTrainConfig(kind="unigram", vocab_size=1000, pad_token="<pad>")
    assert uni.special_tokens == ("<unk>", "<s>", "</s>", "<pad>")
    assert (uni.min_frequency, uni.normalization, uni.add_bos, uni.max_token_length) == (None, "nfkc", True, 16)
    assert dataclasses.replace(uni) == uni, "a built config rebuilds to itself"
    assert train_from_config(["aaa bbb"] * 3, TokenizerTrainConfig(vocab_size=300)).vocab_size <= 300


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kind="wordpiece", vocab_size=1000), r"kind='wordpiece' .*allowed: 'bpe' .* or 'unigram'"),
        (dict(kind="bpe", vocab_size=257), r"vocab_size=257 .*256 byte tokens \+ 1 special tokens.*vocab_size >= 258"),
        (dict(kind="bpe", vocab_size=100, special_tokens=["<a>", "<b>"]), r"vocab_size >= 260"),
        (dict(kind="unigram", vocab_size=270), r"vocab_size=270 .*256 byte pieces.*vocab_size >= 280"),
        (dict(kind="bpe", vocab_size=1000.0), r"vocab_size=1000.0 must be an integer"),
        (dict(kind="bpe", vocab_size=1000, min_frequency=0), r"min_frequency=0 must be an integer >= 1"),
        (dict(kind="unigram", vocab_size=1000, min_frequency=2), r"min_frequency=2 applies to kind='bpe' only"),
        (dict(kind="bpe", vocab_size=1000, byte_fallback=False), r"byte_fallback=False is not possible"),
        (dict(kind="unigram", vocab_size=1000, unk_token=""), r"unk_token='' is not allowed"),
        (dict(kind="bpe", vocab_size=1000, normalization="nfd"), r"normalization='nfd' .*allowed: 'none', 'nfkc'"),
        (dict(kind="bpe", vocab_size=1000, add_bos=True, bos_token=""), r"add_bos=True needs a bos_token"),
        (dict(kind="bpe", vocab_size=1000, special_tokens=["<a>", ""]), r"special_tokens=.*non-empty strings"),
        (dict(kind="bpe", vocab_size=1000, max_token_length=1), r"max_token_length=1 must be None or an integer >= 2"),
        (dict(kind="unigram", vocab_size=1000, max_token_length=0), r"max_token_length=0 .* integer >= 1"),
    ],
)
def test_bad_config_raises_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TokenizerTrainConfig(**kwargs)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
@pytest.mark.parametrize(
    ("texts", "match"),
    [
        ([], r"corpus is empty \(0 documents"),
        (["", ""], r"corpus is empty \(2 documents, all empty\)"),
        (iter(()), r"corpus is empty"),
        ("a single string", r"got a single string"),
        (["fine", b"bytes"], r"document 1 is a bytes, expected str"),
        ([Path("a.txt")], r"document 0 is a \w*Path, expected str; read files with .*iter_text_files"),
    ],
)
def test_bad_corpus_raises_config_error(kind, texts, match):
    with pytest.raises(ConfigError, match=match):
        train_tokenizer(texts, kind, vocab_size=1000)


def test_unigram_corpus_with_too_many_characters_raises_config_error():
    text = "".join(chr(0x4E00 + i) for i in range(200)) * 2  # 200 distinct CJK characters
    # 3 special + 256 byte pieces + 200 + "a", "b", "▁" + 19 byte-piece characters = 481 > 400
    with pytest.raises(ConfigError, match=r"vocab_size=400 is too small for this corpus: .* 203 distinct ones"):
        train_tokenizer([text, "a b"], "unigram", vocab_size=400)


def test_unreadable_file_raises_config_error(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"cannot read training document .*latin1.txt as utf-8"):
        train_tokenizer(iter_text_files([bad]), "bpe", vocab_size=1000)
    with pytest.raises(ConfigError, match=r"missing.txt"):
        list(iter_text_files([tmp_path / "missing.txt"]))
