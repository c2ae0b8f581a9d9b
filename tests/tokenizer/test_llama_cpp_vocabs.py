"""evolm's GGUF tokenizers against the ids llama.cpp's own test expects for its vocab files.

For every `models/ggml-vocab-<name>.gguf` with reference files, each test string is encoded the
way `tests/test-tokenizer-0.cpp` encodes it: no BOS/EOS (`add_special=false`) and control tokens
read as plain text (`parse_special=false`, which is `encode_special_tokens = True` in
`tokenizers`; user-defined tokens still match, in both). The ids must be equal.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import tokenizers

from evolm.errors import UnsupportedModelError
from evolm.tokenizer.gguf_vocab import GGUFVocab, read_gguf_vocab

# every llama.cpp vocabulary that ships .inp/.out files (llama-cpp-python 0.3.36)
REFERENCE_VOCABS = [
    "bert-bge",
    "command-r",
    "deepseek-coder",
    "deepseek-llm",
    "falcon",
    "gemma-4",
    "gpt-2",
    "llama-bpe",
    "llama-spm",
    "mpt",
    "phi-3",
    "qwen2",
    "qwen35",
    "refact",
    "starcoder",
]
# vocabularies evolm cannot build, and what is missing: these must raise UnsupportedModelError
# and their conformance tests are expected failures (none at llama-cpp-python 0.3.36)
UNSUPPORTED: dict[str, str] = {}
# vocabularies whose decoding cannot give the text back
LOSSY = {"bert-bge": "BERT lowercases, strips accents and drops whitespace before WordPiece"}
# what `add_special=true` puts around the ids: llama.cpp's defaults for the tokenizer type and
# pre-tokenizer, overridden by the file's add_bos/add_eos flags (BERT: [CLS] ... [SEP])
SPECIAL_IDS: dict[str, tuple[list[int], list[int]]] = {
    "bert-bge": ([101], [102]),
    "command-r": ([5], []),
    "deepseek-coder": ([32013], []),
    "deepseek-llm": ([100000], []),
    "falcon": ([], []),
    "gemma-4": ([2], []),
    "gpt-2": ([], []),
    "llama-bpe": ([128000], []),
    "llama-spm": ([1], []),
    "mpt": ([], []),
    "phi-3": ([1], []),
    "qwen2": ([], []),
    "qwen35": ([], []),
    "refact": ([], []),
    "starcoder": ([], []),
}


@contextmanager
def control_tokens_as_text(tok: tokenizers.Tokenizer) -> Iterator[tokenizers.Tokenizer]:
    """llama.cpp's `parse_special=false` for the duration of a block."""
    before = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        yield tok
    finally:
        tok.encode_special_tokens = before


@pytest.fixture(scope="module", params=REFERENCE_VOCABS)
def reference(request, llama_cpp_reference):
    return llama_cpp_reference(request.param)


@pytest.fixture(scope="module")
def vocab(reference) -> GGUFVocab:
    if reference.name in UNSUPPORTED:
        with pytest.raises(UnsupportedModelError):
            read_gguf_vocab(reference.gguf)
        pytest.xfail(f"{reference.name}: {UNSUPPORTED[reference.name]}")
    return read_gguf_vocab(reference.gguf)


def test_reference_files_are_complete(reference):
    assert len(reference.inputs) >= 40 and len(reference.inputs) == len(reference.expected)
    assert "" in reference.inputs and "Hello world" in reference.inputs


def test_ids_equal_llama_cpp(reference, vocab):
    tok = vocab.tokenizer
    with control_tokens_as_text(tok):
        got = [enc.ids for enc in tok.encode_batch(reference.inputs, add_special_tokens=False)]
    wrong = [
        f"{text!r}: expected {want}, got {ids}"
        for text, want, ids in zip(reference.inputs, reference.expected, got, strict=True)
        if ids != want
    ]
    assert not wrong, f"{reference.name}: {len(wrong)} of {len(got)} differ:\n" + "\n".join(wrong[:5])


def test_decode_gives_the_text_back(reference, vocab):
    if reference.name in LOSSY:
        pytest.skip(f"{reference.name}: {LOSSY[reference.name]} (see test_bert_decoding_is_normalised)")
    tok = vocab.tokenizer
    with control_tokens_as_text(tok):
        for text in reference.inputs:
            ids = tok.encode(text, add_special_tokens=False).ids
            assert tok.decode(ids, skip_special_tokens=False) == text, (reference.name, text)
    # and llama.cpp's ids decode to the same text
    for text, want in zip(reference.inputs, reference.expected, strict=True):
        assert tok.decode(want, skip_special_tokens=False) == text, (reference.name, text)


def test_special_tokens_around_the_text(reference, vocab):
    head, tail = SPECIAL_IDS[reference.name]
    assert vocab.add_bos_token == bool(head)
    tok = vocab.tokenizer
    with control_tokens_as_text(tok):
        for text, want in list(zip(reference.inputs, reference.expected, strict=True))[:12]:
            assert tok.encode(text).ids == head + want + tail, (reference.name, text)


def test_control_tokens_parse_only_when_asked(llama_cpp_reference):
    vocab = read_gguf_vocab(llama_cpp_reference("gpt-2").gguf)
    tok = vocab.tokenizer
    assert vocab.special_tokens == ["<|endoftext|>"]
    assert tok.encode("a<|endoftext|>b", add_special_tokens=False).ids == [64, 50256, 65]
    with control_tokens_as_text(tok):
        ids = tok.encode("a<|endoftext|>b", add_special_tokens=False).ids
    assert 50256 not in ids and tok.decode(ids) == "a<|endoftext|>b"


def test_bert_decoding_is_normalised(llama_cpp_reference):
    tok = read_gguf_vocab(llama_cpp_reference("bert-bge").gguf).tokenizer
    enc = tok.encode("Héllo,   WORLD! Tokenizers\tRÉSUMÉ", add_special_tokens=False)
    assert enc.tokens == ["hello", ",", "world", "!", "token", "##izer", "##s", "resume"]
    assert tok.decode(enc.ids) == "hello, world! tokenizers resume"


# --- vocabularies without reference ids ---------------------------------------------------------

# name -> (tokenizer.ggml.model, add_bos, add_eos)
UNREFERENCED = {
    "aquila": ("gpt2", False, False),
    "baichuan": ("llama", True, False),
    "gpt-neox": ("gpt2", False, False),
}


@pytest.mark.parametrize("name", sorted(UNREFERENCED))
def test_unreferenced_vocab_round_trips(name, llama_cpp_vocab, llama_cpp_reference):
    """Vocabularies llama.cpp ships without ids: they load and give every test string back."""
    vocab = read_gguf_vocab(llama_cpp_vocab(name))
    _, add_bos, add_eos = UNREFERENCED[name]
    assert (vocab.add_bos_token, vocab.add_eos_token) == (add_bos, add_eos)
    tok = vocab.tokenizer
    with control_tokens_as_text(tok):
        for text in llama_cpp_reference("qwen35").inputs:
            ids = tok.encode(text, add_special_tokens=False).ids
            assert tok.decode(ids, skip_special_tokens=False) == text, (name, text)


def test_unigram_vocab_matches_transformers(llama_cpp_vocab):
    """nomic-bert-moe's SentencePiece unigram vocabulary ("t5"), against transformers' reading.

    transformers leaves out the file's precompiled normalisation map, so the two agree on text
    that the map leaves alone; where it rewrites (NFKC: full-width letters, ligatures) only
    evolm folds as SentencePiece does.
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    path = llama_cpp_vocab("nomic-bert-moe")
    vocab = read_gguf_vocab(path)
    ref, _ = convert_gguf_tokenizer(*get_gguf_tokenizer(str(path))[:2])
    tok = vocab.tokenizer
    texts = [
        "Hello world",
        "The quick brown fox jumps over the lazy dog.",
        "  leading  and   repeated spaces ",
        "日本語のテキスト 中文 한국어",
        "tab\there\nnew line",
        "emoji 😀👍🏽",
        "über naïve café",
        "I'm can't won't",
    ]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False).ids == ref.encode(text, add_special_tokens=False).ids
    assert tok.encode("Hello world").tokens == ["<s>", "▁Hello", "▁world", "</s>"]
    assert tok.encode("ＡＢＣ ﬁ", add_special_tokens=False).tokens == ["▁ABC", "▁fi"]
    assert tok.decode(tok.encode("Hello  world").ids, skip_special_tokens=True) == "Hello world"
