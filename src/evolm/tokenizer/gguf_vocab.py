"""Build a Hugging Face `tokenizers.Tokenizer` from the vocabulary inside a GGUF file.

A GGUF carries no `tokenizer.json`, only llama.cpp's `tokenizer.ggml.*` keys: the token list,
merges or scores, token types, special ids and the name of a pre-tokenizer. We rebuild the
tokenizer llama.cpp runs from them (`src/llama-vocab.cpp`), which is the one the model was
converted from:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE (Radford et al., 2019, GPT-2) with the file's
  merges. `tokenizer.ggml.pre` names the split regexes; llama.cpp applies them one after another,
  which is a `Sequence` of `Split(..., "isolated")` here, then the byte-to-unicode map.
- `tokenizer.ggml.model == "llama"`: SentencePiece BPE (Kudo & Richardson, 2018) with byte
  fallback. llama.cpp merges the adjacent pair whose union has the highest score; that is BPE
  with one merge per (left, right) split of every normal token, ranked by the token's score.
  Spaces become "▁" and a "▁" is prepended to each text segment (`add_space_prefix`), also
  after a special token, as llama.cpp and HF's Llama `tokenizer.json` do.

Tokens typed CONTROL or UNKNOWN become special `AddedToken`s and USER_DEFINED ones plain added
tokens, so all three are matched whole in text, as llama.cpp's special-token partition does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from evolm.checkpoint.gguf import gguf_field, open_gguf
from evolm.errors import CheckpointError, UnsupportedModelError

__all__ = ["GGUFVocab", "read_gguf_vocab"]

# llama.cpp's token types (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

# Split regexes, copied in meaning from llama.cpp's `llm_tokenizer_bpe` (which rewrites
# `(?i:'s|...)` as `'[sS]|...`; both mean the same).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


@dataclass(frozen=True)
class _PreTokenizer:
    """One llama.cpp pre-tokenizer type: its regexes and the defaults it brings."""

    splits: tuple[str, ...]
    ignore_merges: bool = False  # a whole pre-token found in the vocab skips BPE (Llama 3)
    add_bos: bool = False


_LLAMA3_PRE = _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_STARCODER_PRE = _PreTokenizer((r"\p{N}", _GPT2))  # one token per digit, then GPT-2
_GPT2_PRE = _PreTokenizer((_GPT2,))
_QWEN2_PRE = _PreTokenizer((_QWEN2,))

# `tokenizer.ggml.pre` -> pre-tokenizer, as llama.cpp's `llama_vocab::impl::load` groups them.
_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
        _LLAMA3_PRE,
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _PreTokenizer((_LLAMA3,))),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        _STARCODER_PRE,
    ),
    **dict.fromkeys(
        (
            "gpt-2",
            "phi-2",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "exaone4",
            "jina-es",
            "jina-de",
            "jina-v2-es",
            "jina-v2-de",
            "gigachat",
            "mellum",
        ),
        _GPT2_PRE,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "stablelm2", "megrez", "hunyuan"), _QWEN2_PRE),
}

_MODELS = ("gpt2", "llama")


@dataclass
class GGUFVocab:
    """The tokenizer a GGUF file describes.

    Attributes:
        tokenizer: Encodes like the model's reference tokenizer; its post-processor adds BOS/EOS
            when `add_special_tokens=True` and the file asks for them.
        bos_token_id: `tokenizer.ggml.bos_token_id`, or None.
        eos_token_id: `tokenizer.ggml.eos_token_id`, or None.
        pad_token_id: `tokenizer.ggml.padding_token_id`, or None.
        unk_token_id: `tokenizer.ggml.unknown_token_id`, or None.
        add_bos_token: Whether encoding prepends BOS (file flag, else llama.cpp's default).
        add_eos_token: Whether encoding appends EOS.
        chat_template: `tokenizer.chat_template` (Jinja2), or None.
        special_tokens: Tokens typed CONTROL, USER_DEFINED or UNKNOWN, in id order.
    """

    tokenizer: tokenizers.Tokenizer = field(repr=False)
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None
    special_tokens: list[str]


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's highest-score-pair merging.

    Every split (left, right) of a normal token whose halves are both normal tokens is a merge,
    ranked by the merged token's score (highest first, then lowest id).
    """
    normal = {tok for tok, kind in zip(tokens, types, strict=True) if kind == _NORMAL}
    ranked = []
    for index, (tok, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        if kind != _NORMAL:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _bpe_merges(path: Path, merges: list[str]) -> list[tuple[str, str]]:
    """`"left right"` strings split at the first space after the first character (llama.cpp)."""
    pairs = []
    for i, merge in enumerate(merges):
        cut = merge.find(" ", 1)
        if cut < 0:
            raise CheckpointError(f"{path}: tokenizer.ggml.merges[{i}] is {merge!r}, expected 'left right'")
        pairs.append((merge[:cut], merge[cut + 1 :]))
    return pairs


def _byte_level_tokenizer(
    path: Path, vocab: dict[str, int], pre_name: str, merges: list[str]
) -> tuple[tokenizers.Tokenizer, bool]:
    """GPT-2 style byte-level BPE; returns the tokenizer and llama.cpp's default add_bos."""
    pre = _PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise UnsupportedModelError(f"{path}: tokenizer.ggml.pre is {pre_name!r}; supported: {sorted(_PRE_TOKENIZERS)}")
    bpe = models.BPE(vocab=vocab, merges=_bpe_merges(path, merges), ignore_merges=pre.ignore_merges)
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok, pre.add_bos


def _sentencepiece_tokenizer(
    vocab: dict[str, int],
    tokens: list[str],
    scores: list[float],
    types: list[int],
    unk: str | None,
    add_space_prefix: bool,
) -> tokenizers.Tokenizer:
    """SentencePiece BPE with byte fallback, spaces as "▁", optional "▁" before each segment."""
    bpe = models.BPE(
        vocab=vocab, merges=_spm_merges(tokens, scores, types), unk_token=unk, fuse_unk=True, byte_fallback=True
    )
    tok = tokenizers.Tokenizer(bpe)
    prefix = [normalizers.Prepend("▁")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return tok


def _post_processor(
    tokens: list[str], bos: int | None, eos: int | None, add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing | None:
    """BOS/EOS around each sequence, as llama.cpp's `tokenize(..., add_special=true)`."""
    if not (add_bos or add_eos):
        return None
    head = [tokens[bos]] if add_bos else []
    tail = [tokens[eos]] if add_eos else []
    specials = {tokens[i]: i for i, on in ((bos, add_bos), (eos, add_eos)) if on}
    return processors.TemplateProcessing(
        single=[*head, "$A", *tail],
        pair=[*head, "$A", *tail, *head, "$B:1", *tail],
        special_tokens=list(specials.items()),
    )


def read_gguf_vocab(path: str | Path) -> GGUFVocab:
    """Read the tokenizer stored in a GGUF file's metadata.

    Args:
        path: The .gguf file.

    Returns:
        The tokenizer and its special ids, flags and chat template.

    Raises:
        CheckpointError: unreadable file, or tokenizer metadata missing or inconsistent.
        UnsupportedModelError: a `tokenizer.ggml.model` or `tokenizer.ggml.pre` not handled here.
    """
    path = Path(path)
    reader = open_gguf(path)
    model = gguf_field(reader, "tokenizer.ggml.model")
    if model not in _MODELS:
        raise UnsupportedModelError(f"{path}: tokenizer.ggml.model is {model!r}; supported: {list(_MODELS)}")
    tokens = [tok or f"[EMPTY_{i}]" for i, tok in enumerate(gguf_field(reader, "tokenizer.ggml.tokens"))]
    n = len(tokens)
    types = gguf_field(reader, "tokenizer.ggml.token_type", None) or [_NORMAL] * n
    if len(types) != n:
        raise CheckpointError(
            f"{path}: tokenizer.ggml.token_type has {len(types)} entries, expected {n} (one per token)"
        )
    ids = {}
    for key in ("bos", "eos", "padding", "unknown"):
        value = gguf_field(reader, f"tokenizer.ggml.{key}_token_id", None)
        if value is not None and not 0 <= int(value) < n:
            raise CheckpointError(
                f"{path}: tokenizer.ggml.{key}_token_id is {value}, expected an id below the vocabulary size {n}"
            )
        ids[key] = None if value is None else int(value)

    vocab = {tok: i for i, tok in enumerate(tokens)}  # a repeated string keeps its last id
    if model == "gpt2":
        merges = gguf_field(reader, "tokenizer.ggml.merges", None)
        if merges is None:
            raise CheckpointError(f"{path}: tokenizer.ggml.merges is missing; a 'gpt2' tokenizer needs its merges")
        pre_name = gguf_field(reader, "tokenizer.ggml.pre", "default")
        tok, default_bos = _byte_level_tokenizer(path, vocab, pre_name, merges)
    else:
        scores = gguf_field(reader, "tokenizer.ggml.scores", None)
        if scores is None or len(scores) != n:
            found = "missing" if scores is None else f"{len(scores)} entries"
            raise CheckpointError(
                f"{path}: tokenizer.ggml.scores is {found}, expected {n} (one per token) for a 'llama' tokenizer"
            )
        unk = None if ids["unknown"] is None else tokens[ids["unknown"]]
        add_space_prefix = bool(gguf_field(reader, "tokenizer.ggml.add_space_prefix", True))
        tok = _sentencepiece_tokenizer(vocab, tokens, scores, types, unk, add_space_prefix)
        default_bos = True

    whole = [i for i, kind in enumerate(types) if kind in (_CONTROL, _UNKNOWN, _USER_DEFINED)]
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in whole if types[i] != _USER_DEFINED]
    )
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in whole if types[i] == _USER_DEFINED])

    add_bos = bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", default_bos))
    add_eos = bool(gguf_field(reader, "tokenizer.ggml.add_eos_token", False))
    for flag, on, key in (("add_bos_token", add_bos, "bos"), ("add_eos_token", add_eos, "eos")):
        if on and ids[key] is None:
            raise CheckpointError(f"{path}: tokenizer.ggml.{flag} is true but tokenizer.ggml.{key}_token_id is missing")
    tok.post_processor = _post_processor(tokens, ids["bos"], ids["eos"], add_bos, add_eos)
    return GGUFVocab(
        tokenizer=tok,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["padding"],
        unk_token_id=ids["unknown"],
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        chat_template=gguf_field(reader, "tokenizer.chat_template", None),
        special_tokens=[tokens[i] for i in whole],
    )
