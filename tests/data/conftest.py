"""Tokenizers built in the test session, so the data tests depend on no downloaded vocabulary.

- ``bpe_tokenizer``: a byte-level BPE (GPT-2's scheme: bytes mapped to printable characters,
  merges learned) trained on a slice of the standard library, with ``<|endoftext|>`` as EOS.
  Decoding is lossless, so a dataset's tokens decode back to its documents exactly.
- ``word_tokenizer``: a word-level vocabulary ``w0 .. w{n-1}`` split on whitespace, so each
  token of a synthetic document can be made unique and traced back to its document and place.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from evolm.data.corpus import read_python, stdlib_files
from evolm.tokenizer import Tokenizer

EOS = "<|endoftext|>"


@pytest.fixture(scope="session")
def bpe_tokenizer() -> Tokenizer:
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [read_python(p) for p in stdlib_files()[:40]]
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend=backend, eos_token_id=backend.token_to_id(EOS), source="test:bpe")


def make_word_tokenizer(n_words: int, eos: bool) -> Tokenizer:
    """Word-level tokenizer over ``w0 .. w{n_words-1}`` (+ ``<eos>`` with id ``n_words`` if ``eos``)."""
    vocab = {f"w{i}": i for i in range(n_words)}
    if eos:
        vocab["<eos>"] = n_words
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if eos:
        backend.add_special_tokens(["<eos>"])
    return Tokenizer(backend=backend, eos_token_id=n_words if eos else None, source=f"test:words{n_words}")


@pytest.fixture(scope="session")
def word_tokenizer() -> Tokenizer:
    return make_word_tokenizer(5000, eos=False)


@pytest.fixture(name="make_word_tokenizer")
def make_word_tokenizer_fixture() -> Callable[[int, bool], Tokenizer]:
    return make_word_tokenizer
