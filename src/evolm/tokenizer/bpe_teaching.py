"""Byte-level BPE in plain Python: the algorithm behind GPT-2's tokenizer, small enough to read.

Byte-pair encoding (Sennrich, Haddow & Birch, 2016, "Neural Machine Translation of Rare Words
with Subword Units") starts from single symbols and repeatedly merges the most frequent adjacent
pair into a new symbol, until the vocabulary has the size asked for. The list of merges, in the
order they were learned, *is* the tokenizer: encoding replays them.

GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners") made two
choices that the Hugging Face ``tokenizers`` library copies and this module copies too:

1. The symbols are *bytes*, not characters, so every string is encodable and there is no
   unknown token. Each byte is shown as a printable unicode character (``bytes_to_unicode``;
   a space is ``"Ġ"``, a newline ``"Ċ"``) so that tokens stay readable strings.
2. Text is first split by a regular expression into words, numbers, punctuation runs and
   whitespace runs (``GPT2_SPLIT_PATTERN``); merges never cross those boundaries.

This is the teaching version: ``evolm.tokenizer.train`` trains with the library (Rust, parallel).
The tests check that both learn the same merges in the same order and encode text to the same
ids, which pins down the details a textbook description leaves open: ids are assigned special
tokens first, then the 256 byte symbols sorted by their printable character, then one per merge;
among pairs of equal count the one with the smaller ``(left id, right id)`` is merged first.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from tokenizers import Regex
from tokenizers.pre_tokenizers import Split

GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""GPT-2's pre-tokenization regex: contractions, letter runs, digit runs and punctuation runs
(each with at most one leading space), then whitespace runs. ``\\s+(?!\\S)`` leaves the last space
of a run to the word that follows it, so ``"a  b"`` splits as ``["a", " ", " b"]``."""

T = TypeVar("T")
_SPLITTER = Split(Regex(GPT2_SPLIT_PATTERN), behavior="isolated")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from the 256 byte values to 256 printable unicode characters.

    Bytes that are printable Latin-1 characters map to themselves; the others (control bytes,
    space, DEL, no-break space, soft hyphen) map to consecutive code points from 256 upwards,
    in byte order. So ``" "`` (0x20) becomes ``"Ġ"`` (U+0120) and ``"\\n"`` becomes ``"Ċ"``.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
_LATIN1_TO_CHAR = str.maketrans(BYTE_TO_CHAR)  # applied to bytes decoded as Latin-1 (one char per byte)


def pretokenize(text: str) -> list[str]:
    """Split ``text`` with ``GPT2_SPLIT_PATTERN`` and spell each piece's UTF-8 bytes as characters.

    The split uses the ``tokenizers`` regex engine (no extra dependency); the pattern is the one
    the ``regex`` package would run for ``regex.findall(GPT2_SPLIT_PATTERN, text)``.
    """
    pieces = _SPLITTER.pre_tokenize_str(text)  # [(piece, (start, end)), ...]
    return [piece.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_CHAR) for piece, _ in pieces]


@dataclass
class ByteLevelBPE:
    """A trained byte-level BPE: the vocabulary and the merges, in the order they were learned.

    Attributes:
        vocab: Token string (bytes spelled with ``BYTE_TO_CHAR``) -> id.
        merges: ``(left, right)`` token strings; index = rank, lower ranks are applied first.
        special_tokens: Strings that got the first ids; ``encode`` treats them as plain text.
    """

    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    special_tokens: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._id_to_token = {i: t for t, i in self.vocab.items()}

    def _encode_word(self, word: str) -> list[str]:
        """Replay the merges on one pre-token: always the lowest-ranked pair present, everywhere.

        Merging the lowest rank first reproduces training: a pair that contains a token made by
        merge ``r`` has a rank above ``r``, so it is only looked at once merge ``r`` has been applied.
        """
        symbols = list(word)
        while len(symbols) > 1:
            pairs = set(itertools.pairwise(symbols))
            best = min(pairs, key=lambda p: self._ranks.get(p, len(self._ranks)))
            if best not in self._ranks:
                break
            symbols = _merge_pair(symbols, best, best[0] + best[1])
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens are added or recognised)."""
        return [self.vocab[s] for word in pretokenize(text) for s in self._encode_word(word)]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``: map each character of each token back to its byte, then read UTF-8."""
        tokens = (self._id_to_token[i] for i in ids)
        data = b"".join(t.encode() if t in self.special_tokens else bytes(CHAR_TO_BYTE[c] for c in t) for t in tokens)
        return data.decode("utf-8", errors="replace")


def _merge_pair(symbols: list[T], pair: tuple[T, T], new: T) -> list[T]:
    """Replace every non-overlapping occurrence of ``pair`` in ``symbols``, scanning left to right."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def train_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 1, special_tokens: Iterable[str] = ()
) -> ByteLevelBPE:
    """Learn byte-level BPE merges from ``texts`` until the vocabulary has ``vocab_size`` tokens.

    1. Count pre-tokens (``pretokenize``); the same word in many places is stored once, with a count.
    2. Give ids to the special tokens, then to the 256 byte characters in code-point order.
    3. Count every adjacent pair of symbols, weighted by the word's count.
    4. Repeat: take the most frequent pair (ties: smallest ``(left id, right id)``), stop if its
       count is below ``min_frequency``, add ``left + right`` to the vocabulary (a string that is
       already there keeps its id), rewrite the words that contain the pair and update the counts
       of the pairs around each rewritten occurrence.

    The pair counts live in a heap of ``(-count, left, right)``. A count that changes is pushed
    again instead of being searched for; an entry whose count is no longer current is dropped when
    it reaches the top. Only the words that contain the merged pair are touched.

    Args:
        texts: Documents.
        vocab_size: Target size, special tokens and the 256 byte tokens included.
        min_frequency: A pair seen fewer times than this is never merged.
        special_tokens: Tokens that get the first ids and are never merged.
    """
    word_counts = Counter(w for text in texts for w in pretokenize(text))
    specials = list(dict.fromkeys(special_tokens))
    vocab = {t: i for i, t in enumerate(specials)}
    for c in sorted(BYTE_TO_CHAR.values()):
        vocab.setdefault(c, len(vocab))
    names = list(vocab)  # id -> token string

    words = [[vocab[c] for c in w] for w in word_counts]  # each word as a list of token ids
    counts = list(word_counts.values())
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that contain it
    for i, w in enumerate(words):
        for pair in itertools.pairwise(w):
            pair_counts[pair] += counts[i]
            where[pair].add(i)
    heap = [(-n, a, b) for (a, b), n in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -neg:
            continue  # stale entry: the pair's current count was pushed separately
        if -neg < max(min_frequency, 1):
            break
        new_token = names[a] + names[b]
        if new_token not in vocab:
            vocab[new_token] = len(names)
            names.append(new_token)
        new_id = vocab[new_token]
        merges.append((names[a], names[b]))

        changed: set[tuple[int, int]] = set()
        for i in where.pop((a, b)):
            old = words[i]
            new = _merge_pair(old, (a, b), new_id)
            if len(new) == len(old):
                continue  # stale: an earlier merge already rewrote this occurrence
            for pair in itertools.pairwise(old):
                pair_counts[pair] -= counts[i]
                changed.add(pair)
            for pair in itertools.pairwise(new):
                pair_counts[pair] += counts[i]
                where[pair].add(i)
                changed.add(pair)
            words[i] = new
        for pair in changed:
            n = pair_counts[pair]
            if n > 0:
                heapq.heappush(heap, (-n, *pair))
            else:
                del pair_counts[pair]
    return ByteLevelBPE(vocab=vocab, merges=merges, special_tokens=specials)
