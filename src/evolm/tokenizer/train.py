"""Train a tokenizer on your own documents with the Hugging Face ``tokenizers`` library.

Two kinds, the two that most open models use:

- ``"bpe"``: byte-level byte-pair encoding as in GPT-2 (Sennrich et al., 2016; Radford et al.,
  2019). Text is split by GPT-2's regex, each piece is spelled in bytes (shown as printable
  characters, ``" "`` as ``"Ġ"``), and merges are learned over bytes. All 256 bytes are in the
  vocabulary, so every string round-trips exactly and there is no unknown token. No
  normalisation by default. ``evolm.tokenizer.bpe_teaching`` is the same algorithm in plain
  Python; the tests show both learn the same merges.
- ``"unigram"``: the unigram language model of SentencePiece (Kudo, 2018, "Subword
  Regularization"; Kudo & Richardson, 2018, "SentencePiece"). Spaces become ``"▁"``, which
  starts every word (``Metaspace``; a ``"▁"`` is prepended to the start of the text only, not
  after each special token inside it, as in Llama's non-legacy tokenizer); a large seed vocabulary of
  frequent substrings is pruned by EM until ``vocab_size`` pieces remain; encoding is the Viterbi
  segmentation of highest likelihood. As in SentencePiece's default ``nmt_nfkc`` rule, text is
  NFKC-normalised first (full-width letters, ligatures and compatibility characters fold, so
  those do not round-trip; SentencePiece's extra NMT rules, such as collapsing runs of spaces,
  are not applied). With ``byte_fallback`` (the default, as in Llama's SentencePiece models), the
  256 pieces ``<0x00>`` ... ``<0xFF>`` follow the special tokens and a character the vocabulary
  lacks is spelled in UTF-8 bytes instead of becoming ``<unk>``.

``save_tokenizer`` writes ``tokenizer.json``, ``tokenizer_config.json`` and
``special_tokens_map.json``, which ``evolm.load_tokenizer`` and transformers'
``AutoTokenizer.from_pretrained`` both read, with the same ids.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers

from evolm.errors import ConfigError
from evolm.tokenizer.tokenizer import Tokenizer

TokenizerKind = Literal["bpe", "unigram"]
Normalization = Literal["none", "nfkc"]

_KINDS: tuple[str, ...] = ("bpe", "unigram")
_NORMALIZATIONS: tuple[str, ...] = ("none", "nfkc")
_N_BYTES = 256
_METASPACE = "▁"
# Every character of a byte piece "<0xAB>": kept in the Unigram alphabet so that literal text
# like "<0x41>" is always spelled by ordinary pieces (see _add_byte_pieces).
_BYTE_PIECE_CHARS = "<>x0123456789ABCDEF"


@dataclass(frozen=True)
class _KindDefaults:
    special_tokens: tuple[str, ...]
    bos_token: str
    eos_token: str
    pad_token: str
    unk_token: str
    add_bos: bool
    min_frequency: int | None
    max_token_length: int | None
    normalization: Normalization


_DEFAULTS: dict[str, _KindDefaults] = {
    # GPT-2: one special token that ends (and, when asked, starts) every document.
    "bpe": _KindDefaults(("<|endoftext|>",), "<|endoftext|>", "<|endoftext|>", "", "", False, 2, None, "none"),
    # SentencePiece / Llama: <unk>, <s>, </s> are ids 0, 1, 2 and <s> starts every sequence;
    # pieces are at most 16 characters long (SentencePiece's max_sentencepiece_length).
    "unigram": _KindDefaults(("<unk>", "<s>", "</s>"), "<s>", "</s>", "", "<unk>", True, None, 16, "nfkc"),
}


@dataclass(frozen=True)
class TokenizerTrainConfig:
    """What to train: the kind of tokenizer, its size and its special tokens.

    Fields left at None take the kind's default (listed per field) when the config is built, so
    a built config holds concrete values only. A role token (``bos_token`` ...) set to ``""``
    means "no such token". Role tokens missing from ``special_tokens`` are appended to it.

    Attributes:
        kind: ``"bpe"`` (byte-level, GPT-2 style) or ``"unigram"`` (SentencePiece style).
        vocab_size: Size of the trained vocabulary, special tokens (and byte tokens) included.
        special_tokens: Tokens that get the first ids and are never split. Default: bpe
            ``("<|endoftext|>",)``; unigram ``("<unk>", "<s>", "</s>")``.
        bos_token: Beginning-of-sequence token. Default: bpe ``"<|endoftext|>"``; unigram ``"<s>"``.
        eos_token: End-of-sequence token. Default: bpe ``"<|endoftext|>"``; unigram ``"</s>"``.
        pad_token: Padding token. Default: none.
        unk_token: Unknown token. Default: bpe none (bytes cover everything); unigram ``"<unk>"``
            (required: the Unigram model needs one, even when byte fallback means it is never produced).
        add_bos: Prepend ``bos_token`` when encoding. Default: bpe False; unigram True.
        min_frequency: BPE only: a pair seen fewer times is never merged. Default 2. Unigram
            prunes by likelihood and has no count threshold, so this must stay None there.
        max_token_length: Longest token in characters (bpe: in bytes, at least 2). Default: bpe
            unlimited; unigram 16.
        normalization: ``"none"`` or ``"nfkc"``. Default: bpe none; unigram nfkc.
        byte_fallback: Unigram: spell characters missing from the vocabulary as ``<0xAB>`` byte
            pieces instead of ``<unk>``. BPE is byte-level and has no other mode (must be True).
        show_progress: Show the library's progress bars.
    """

    kind: TokenizerKind = "bpe"
    vocab_size: int = 8192
    special_tokens: tuple[str, ...] | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos: bool | None = None
    min_frequency: int | None = None
    max_token_length: int | None = None
    normalization: Normalization | None = None
    byte_fallback: bool = True
    show_progress: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(
                f"TokenizerTrainConfig.kind={self.kind!r} is not a tokenizer kind evolm trains; allowed: "
                "'bpe' (byte-level BPE, GPT-2 style) or 'unigram' (SentencePiece style)"
            )
        d = _DEFAULTS[self.kind]
        resolved = {
            "bos_token": d.bos_token,
            "eos_token": d.eos_token,
            "pad_token": d.pad_token,
            "unk_token": d.unk_token,
            "add_bos": d.add_bos,
            "max_token_length": d.max_token_length,
            "normalization": d.normalization,
        }
        if self.kind == "bpe":
            resolved["min_frequency"] = d.min_frequency
        for name, default in resolved.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        specials = d.special_tokens if self.special_tokens is None else self.special_tokens
        if isinstance(specials, str) or not all(isinstance(t, str) and t for t in specials):
            raise ConfigError(
                f"TokenizerTrainConfig.special_tokens={specials!r} must be a sequence of non-empty strings"
            )
        for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if not isinstance(getattr(self, role), str):
                raise ConfigError(f"TokenizerTrainConfig.{role}={getattr(self, role)!r} must be a string ('' for none)")
        roles = [self.unk_token, self.bos_token, self.eos_token, self.pad_token]
        object.__setattr__(self, "special_tokens", tuple(dict.fromkeys([*specials, *(r for r in roles if r)])))
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int):
            raise ConfigError(f"TokenizerTrainConfig.vocab_size={self.vocab_size!r} must be an integer")
        floor = self.min_vocab_size()
        if self.vocab_size < floor:
            raise ConfigError(
                f"TokenizerTrainConfig.vocab_size={self.vocab_size} is too small for kind={self.kind!r}: it must "
                f"exceed {self._floor_reason()} = {floor - 1}; allowed: vocab_size >= {floor}"
            )
        if self.normalization not in _NORMALIZATIONS:
            raise ConfigError(
                f"TokenizerTrainConfig.normalization={self.normalization!r} is not supported; allowed: 'none', 'nfkc'"
            )
        if self.kind == "bpe":
            if (
                isinstance(self.min_frequency, bool)
                or not isinstance(self.min_frequency, int)
                or self.min_frequency < 1
            ):
                raise ConfigError(
                    f"TokenizerTrainConfig.min_frequency={self.min_frequency!r} must be an integer >= 1 "
                    "(pairs seen fewer times are never merged)"
                )
            if not self.byte_fallback:
                raise ConfigError(
                    "TokenizerTrainConfig.byte_fallback=False is not possible for kind='bpe': byte-level BPE "
                    "always spells text in bytes; use kind='unigram' for a tokenizer with an <unk> token"
                )
        else:
            if self.min_frequency is not None:
                raise ConfigError(
                    f"TokenizerTrainConfig.min_frequency={self.min_frequency!r} applies to kind='bpe' only: Unigram "
                    "prunes pieces by likelihood, not by a count; leave it None"
                )
            if not self.unk_token:
                raise ConfigError(
                    "TokenizerTrainConfig.unk_token='' is not allowed for kind='unigram': the Unigram model needs an "
                    "unknown token (e.g. '<unk>')"
                )
        shortest = 2 if self.kind == "bpe" else 1  # a BPE token of one character is a byte: no merge at all
        if self.max_token_length is not None and (
            isinstance(self.max_token_length, bool)
            or not isinstance(self.max_token_length, int)
            or self.max_token_length < shortest
        ):
            raise ConfigError(
                f"TokenizerTrainConfig.max_token_length={self.max_token_length!r} must be None or an integer "
                f">= {shortest} for kind={self.kind!r}"
            )
        if self.add_bos and not self.bos_token:
            raise ConfigError("TokenizerTrainConfig.add_bos=True needs a bos_token; set bos_token or add_bos=False")

    def _floor_reason(self) -> str:
        n = len(self.special_tokens or ())
        if self.kind == "bpe":
            return f"the {_N_BYTES} byte tokens + {n} special tokens"
        if self.byte_fallback:
            return (
                f"{n} special tokens + {_N_BYTES} byte pieces + {len(_BYTE_PIECE_CHARS) + 1} characters always kept "
                f"({_BYTE_PIECE_CHARS} {_METASPACE}; every other character of the corpus adds one more)"
            )
        return f"{n} special tokens + 1 character always kept ({_METASPACE}; every character of the corpus adds one)"

    def min_vocab_size(self) -> int:
        """The smallest ``vocab_size`` this config allows before seeing the corpus.

        BPE needs every byte and every special token plus one merge; Unigram needs the special
        tokens, the byte pieces (with ``byte_fallback``), one piece per character it must keep and
        one more. Unigram keeps every character of the corpus, so a corpus with many distinct
        characters needs more; ``train_tokenizer`` says how many when it sees them.
        """
        n = len(self.special_tokens or ())
        if self.kind == "bpe":
            return _N_BYTES + n + 1
        chars = 1 + (len(_BYTE_PIECE_CHARS) if self.byte_fallback else 0)  # "▁" (+ byte-piece characters)
        return n + (_N_BYTES if self.byte_fallback else 0) + chars + 1


def iter_text_files(paths: Iterable[str | Path], encoding: str = "utf-8") -> Iterator[str]:
    """Yield the text of each file, one document per file, in the order given.

    Raises:
        ConfigError: A path is not a readable file or not valid text in ``encoding``.
    """
    for p in map(Path, paths):
        try:
            yield p.read_text(encoding=encoding)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read training document {p} as {encoding} text: {e}") from e


def _checked_documents(texts: Iterable[str], chars: set[str] | None = None) -> Iterator[str]:
    """``texts``, failing early on an empty corpus and on a document that is not a string.

    Args:
        texts: Documents.
        chars: If given, collects the distinct characters of the corpus (for error messages).
    """
    if isinstance(texts, str):
        raise ConfigError(
            "train_tokenizer got a single string; pass an iterable of documents, e.g. [text] (a bare string "
            "would be read one character per document)"
        )
    it = iter(texts)
    seen: list[str] = []
    for doc in it:  # find the first non-empty document
        if not isinstance(doc, str):
            raise ConfigError(
                f"training document {len(seen)} is a {type(doc).__name__}, expected str; read files with "
                "evolm.tokenizer.train.iter_text_files(paths)"
            )
        seen.append(doc)
        if doc:
            break
    else:
        raise ConfigError(
            f"the training corpus is empty ({len(seen)} documents, all empty); pass at least one non-empty document"
        )
    for i, doc in enumerate(itertools.chain(seen, it)):
        if not isinstance(doc, str):
            raise ConfigError(f"training document {i} is a {type(doc).__name__}, expected str")
        if chars is not None:
            chars.update(doc)
        yield doc


def _special(tokens: Iterable[str]) -> list[AddedToken]:
    return [AddedToken(t, special=True, normalized=False) for t in tokens]


def _train_bpe(texts: Iterable[str], cfg: TokenizerTrainConfig) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    if cfg.normalization == "nfkc":
        backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=_special(cfg.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        # The library only forms a token shorter than its `max_token_length` (a strict `<` in
        # tokenizers 0.23's Word::merge), so ask for one more to allow tokens of exactly our length.
        max_token_length=None if cfg.max_token_length is None else cfg.max_token_length + 1,
        show_progress=cfg.show_progress,
    )
    backend.train_from_iterator(_checked_documents(texts), trainer)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _train_unigram(texts: Iterable[str], cfg: TokenizerTrainConfig) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.Unigram())
    if cfg.normalization == "nfkc":
        backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="first", split=True)
    n_bytes = _N_BYTES if cfg.byte_fallback else 0
    trainer = trainers.UnigramTrainer(
        vocab_size=cfg.vocab_size - n_bytes,
        special_tokens=_special(cfg.special_tokens),
        unk_token=cfg.unk_token,
        max_piece_length=cfg.max_token_length,
        initial_alphabet=list(_BYTE_PIECE_CHARS) if cfg.byte_fallback else [],
        show_progress=cfg.show_progress,
    )
    chars: set[str] = set()
    try:
        backend.train_from_iterator(_checked_documents(texts, chars), trainer)
        vocab = json.loads(backend.to_str())["model"]["vocab"]  # [[piece, log-prob], ...], specials first
        too_small = len(vocab) + n_bytes > cfg.vocab_size  # the library may keep more characters than asked
    except ConfigError:
        raise
    except Exception:  # the library raises a bare Exception when the characters alone exceed vocab_size
        too_small = True
    if too_small:
        kept = chars | {_METASPACE} | (set(_BYTE_PIECE_CHARS) if cfg.byte_fallback else set())
        need = len(cfg.special_tokens) + n_bytes + len(kept) + 1
        raise ConfigError(
            f"TokenizerTrainConfig.vocab_size={cfg.vocab_size} is too small for this corpus: Unigram keeps every "
            f"character, and the corpus has {len(chars)} distinct ones (before normalisation), so with "
            f"{len(cfg.special_tokens)} special tokens{f' and {n_bytes} byte pieces' if n_bytes else ''} it needs "
            f"vocab_size >= about {need}"
        )
    return _rebuild_unigram(backend, vocab, cfg)


def _rebuild_unigram(backend: tokenizers.Tokenizer, vocab: list, cfg: TokenizerTrainConfig) -> tokenizers.Tokenizer:
    """The trained Unigram model laid out as SentencePiece does: special tokens, byte pieces, pieces.

    Learned pieces that repeat a special token or a byte piece (text such as ``"<s>"`` in the
    corpus) are dropped, so every token string has one id.

    The library's Unigram model looks every piece up in one trie, byte pieces included (SentencePiece
    keeps them out of segmentation). A byte piece therefore gets a log-probability below that of
    spelling its six characters with single-character pieces (all kept: ``_BYTE_PIECE_CHARS``), so
    literal text such as ``"<0x41>"`` is never read as the byte 0x41; byte pieces are only reached
    through byte fallback, which ignores scores.
    """
    n_special = len(cfg.special_tokens)
    byte_pieces = [f"<0x{b:02X}>" for b in range(_N_BYTES)] if cfg.byte_fallback else []
    taken = {*cfg.special_tokens, *byte_pieces}
    learned = [(p, s) for p, s in vocab[n_special:] if p not in taken]
    byte_score = len("<0x00>") * min(s for _, s in learned) - 1.0
    pieces = [*((p, 0.0) for p in cfg.special_tokens), *((p, byte_score) for p in byte_pieces), *learned]
    unk_id = cfg.special_tokens.index(cfg.unk_token)
    rebuilt = tokenizers.Tokenizer(models.Unigram(pieces, unk_id=unk_id, byte_fallback=cfg.byte_fallback))
    rebuilt.normalizer = backend.normalizer
    rebuilt.pre_tokenizer = backend.pre_tokenizer
    if cfg.byte_fallback:
        # As transformers' converter writes Llama's SentencePiece decoder: "▁" -> " ", byte pieces ->
        # bytes, join, drop the space that Metaspace prepended.
        rebuilt.decoder = decoders.Sequence(
            [decoders.Replace(_METASPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        rebuilt.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="first", split=True)
    rebuilt.add_special_tokens(_special(cfg.special_tokens))
    return rebuilt


def _wrap(backend: tokenizers.Tokenizer, cfg: TokenizerTrainConfig, source: str) -> Tokenizer:
    def tid(token: str) -> int | None:
        return backend.token_to_id(token) if token else None

    bos = tid(cfg.bos_token)
    if cfg.add_bos:
        # BOS as a post-processor, so the library adds it itself, exactly as transformers rebuilds it
        # from `add_bos_token` (TemplateProcessing "<s> $A").
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cfg.bos_token}:0 $A:0",
            pair=f"{cfg.bos_token}:0 $A:0 {cfg.bos_token}:1 $B:1",
            special_tokens=[(cfg.bos_token, bos)],
        )
    return Tokenizer(
        backend=backend,
        bos_token_id=bos,
        eos_token_id=tid(cfg.eos_token),
        pad_token_id=tid(cfg.pad_token),
        add_bos=cfg.add_bos,
        chat_template=None,
        source=source,
    )


def train_from_config(texts: Iterable[str], config: TokenizerTrainConfig) -> Tokenizer:
    """Train the tokenizer ``config`` describes on the documents ``texts``.

    Args:
        texts: Documents (strings), read once; ``iter_text_files(paths)`` turns files into documents.
        config: What to train.

    Returns:
        The trained tokenizer; ``save_tokenizer`` writes it to disk.

    Raises:
        ConfigError: The corpus is empty, a document is not a string, or ``vocab_size`` is too small
            for the characters the corpus contains (Unigram).
    """
    backend = _train_bpe(texts, config) if config.kind == "bpe" else _train_unigram(texts, config)
    return _wrap(backend, config, source=f"trained {config.kind} (vocab_size={config.vocab_size})")


def train_tokenizer(
    texts: Iterable[str],
    kind: TokenizerKind = "bpe",
    vocab_size: int = 8192,
    special_tokens: Iterable[str] | None = None,
    **options: Any,
) -> Tokenizer:
    """Train a byte-level BPE or a Unigram tokenizer on ``texts``.

    Args:
        texts: Documents (strings), read once; ``iter_text_files(paths)`` turns files into documents.
        kind: ``"bpe"`` (byte-level, GPT-2 style) or ``"unigram"`` (SentencePiece style).
        vocab_size: Size of the vocabulary, special tokens (and byte tokens) included. A corpus too
            small to learn that many tokens gives a smaller vocabulary.
        special_tokens: Tokens given the first ids; None takes the kind's defaults.
        **options: Any other ``TokenizerTrainConfig`` field (``min_frequency``, ``bos_token``, ...).

    Returns:
        The trained tokenizer, with ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` set.

    Example:
        >>> tok = train_tokenizer(iter_text_files(paths), "bpe", vocab_size=4096)
        >>> save_tokenizer(tok, "my-tokenizer")  # then evolm.load_tokenizer or AutoTokenizer
    """
    specials = None if special_tokens is None else tuple(special_tokens)
    cfg = TokenizerTrainConfig(kind=kind, vocab_size=vocab_size, special_tokens=specials, **options)
    return train_from_config(texts, cfg)


def _unk_token(backend: tokenizers.Tokenizer) -> str | None:
    model = json.loads(backend.to_str())["model"]
    if model.get("type") == "Unigram":
        unk_id = model.get("unk_id")
        return None if unk_id is None else model["vocab"][unk_id][0]
    return model.get("unk_token")


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> Path:
    """Write ``tok`` as a Hugging Face tokenizer directory.

    Files: ``tokenizer.json`` (the ``tokenizers`` serialisation), ``tokenizer_config.json``
    (``tokenizer_class: PreTrainedTokenizerFast``, the role tokens, ``add_bos_token``, the chat
    template) and ``special_tokens_map.json``. ``evolm.load_tokenizer(directory)`` and
    ``transformers.AutoTokenizer.from_pretrained(directory)`` read them to the same ids.

    Args:
        tok: A tokenizer, trained or loaded.
        directory: Created if missing; existing files of these names are replaced.

    Returns:
        The directory.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(out / "tokenizer.json"))
    roles = {**tok.special_tokens(), "unk_token": _unk_token(tok.backend)}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **roles,
        "add_bos_token": tok.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {k: v for k, v in roles.items() if v is not None}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
    return out
