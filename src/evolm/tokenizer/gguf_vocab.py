"""Build a Hugging Face `tokenizers.Tokenizer` from the vocabulary inside a GGUF file.

A GGUF carries no `tokenizer.json`, only llama.cpp's `tokenizer.ggml.*` keys: the token list,
merges or scores, token types, special ids and the name of a pre-tokenizer. We rebuild the
tokenizer llama.cpp runs from them (`src/llama-vocab.cpp`), which is the one the model was
converted from, and check it against the reference ids llama.cpp ships (`models/ggml-vocab-*`):

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE (Radford et al., 2019, GPT-2) with the file's
  merges. `tokenizer.ggml.pre` names the split regexes; llama.cpp applies them one after another,
  which is a `Sequence` of `Split(..., "isolated")` here, then the byte-to-unicode map. A few
  pre-tokenizers (Gemma 4, Sarvam) run BPE on raw UTF-8 with spaces as "▁" and `<0xXX>` byte
  tokens instead; `tokenizer.ggml.model == "gemma4"` is that kind.
- `tokenizer.ggml.model == "llama"`: SentencePiece BPE (Kudo & Richardson, 2018) with byte
  fallback. llama.cpp merges the adjacent pair whose union has the highest score; that is BPE
  with one merge per (left, right) split of every normal token, ranked by the token's score.
  Spaces become "▁" and a "▁" is prepended to each text segment (`add_space_prefix`), also
  after a special token, as llama.cpp and HF's Llama `tokenizer.json` do.
- `tokenizer.ggml.model == "bert"`: WordPiece (Wu et al., 2016, GNMT; Devlin et al., 2019, BERT)
  after BERT's normaliser and punctuation split. llama.cpp stores word-initial pieces as "▁x"
  and continuations as "x"; they go back to BERT's "x" and "##x".
- `tokenizer.ggml.model == "t5"`: SentencePiece unigram (Kudo, 2018) after the file's
  precompiled normalisation map (`tokenizer.ggml.precompiled_charsmap`).

Tokens typed CONTROL or UNKNOWN become special `AddedToken`s and USER_DEFINED ones plain added
tokens, so all three are matched whole in text, as llama.cpp's special-token partition does.
llama.cpp's `tokenize(..., parse_special=false)` corresponds to `encode_special_tokens = True`
on the returned tokenizer: control tokens are then read as text, user-defined ones still match.

The metadata is parsed here rather than with `gguf.GGUFReader`, which builds a numpy view per
array element and needs ~20 s for a 256k-token vocabulary; only the key/value section is read.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from evolm.errors import CheckpointError, UnsupportedModelError

__all__ = ["GGUFVocab", "read_gguf_vocab"]

# llama.cpp's token types (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# --- metadata --------------------------------------------------------------------------------------

# GGUF value types (ggml-org/ggml docs/gguf.md): scalar type -> struct code.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MISSING = object()


class _Truncated(Exception):
    """The key/value section runs past the end of the file."""


class _Metadata:
    """Parser for the key/value section of a GGUF v2/v3 file over a read-only buffer."""

    def __init__(self, buf: mmap.mmap | bytes, endian: str) -> None:
        self.buf = buf
        self.e = endian
        self.u32 = struct.Struct(endian + "I").unpack_from
        self.u64 = struct.Struct(endian + "Q").unpack_from

    def read_u32(self, off: int) -> tuple[int, int]:
        return self.u32(self.buf, off)[0], off + 4

    def read_u64(self, off: int) -> tuple[int, int]:
        return self.u64(self.buf, off)[0], off + 8

    def read_str(self, off: int) -> tuple[str, int]:
        size, off = self.read_u64(off)
        end = off + size
        if end > len(self.buf):
            raise _Truncated(f"a {size}-byte string runs past the end of the file")
        return str(self.buf[off:end], "utf-8"), end

    def read_value(self, kind: int, off: int) -> tuple[Any, int]:
        if kind == _STRING:
            return self.read_str(off)
        if kind in _SCALARS:
            code = self.e + _SCALARS[kind]
            return struct.unpack_from(code, self.buf, off)[0], off + struct.calcsize(code)
        if kind != _ARRAY:
            raise ValueError(f"unknown value type {kind}")
        item, off = self.read_u32(off)
        n, off = self.read_u64(off)
        if item == _STRING:
            out = []
            for _ in range(n):
                s, off = self.read_str(off)
                out.append(s)
            return out, off
        if item in _SCALARS:
            dtype = np.dtype(self.e + _SCALARS[item])
            if off + n * dtype.itemsize > len(self.buf):
                raise _Truncated(f"an array of {n} values runs past the end of the file")
            return np.frombuffer(self.buf, dtype=dtype, count=n, offset=off).tolist(), off + n * dtype.itemsize
        out = []
        for _ in range(n):
            value, off = self.read_value(item, off)
            out.append(value)
        return out, off


def _read_metadata(path: Path) -> dict[str, Any]:
    """Every metadata key of a GGUF v2/v3 file: scalars, strings, and lists for arrays.

    Raises:
        CheckpointError: missing file, not a GGUF, an unsupported version, or a key/value
            section that is truncated, corrupt or not valid UTF-8.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    with path.open("rb") as fh:
        head = fh.read(24)  # magic, version, tensor count, key count
        if head[:4] != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (expected magic b'GGUF', found {head[:4]!r})")
        if len(head) < 24:
            raise CheckpointError(f"{path}: GGUF header truncated ({len(head)} of 24 bytes)")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            # a big-endian file's version reads as (version << 24) little-endian
            endian = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"
            meta = _Metadata(buf, endian)
            version, off = meta.read_u32(4)
            if version not in (2, 3):
                raise CheckpointError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
            where = "the header"
            try:
                _, off = meta.read_u64(off)  # tensor count
                n_kv, off = meta.read_u64(off)
                fields: dict[str, Any] = {}
                for i in range(n_kv):
                    where = f"key #{i}"
                    key, off = meta.read_str(off)
                    where = f"key {key!r}"
                    kind, off = meta.read_u32(off)
                    fields[key], off = meta.read_value(kind, off)
            except UnicodeDecodeError as exc:
                raise CheckpointError(f"{path}: metadata {where} is not valid UTF-8: {exc}") from exc
            except (_Truncated, struct.error, ValueError, OverflowError, MemoryError) as exc:
                raise CheckpointError(f"{path}: GGUF metadata truncated or corrupt at {where}: {exc}") from exc
    return fields


def _field(fields: dict[str, Any], path: Path, key: str, default: Any = _MISSING) -> Any:
    """One metadata value; an absent key raises unless a default is given."""
    if key in fields:
        return fields[key]
    if default is _MISSING:
        raise CheckpointError(f"{path}: metadata key {key!r} is missing")
    return default


# --- pre-tokenizers --------------------------------------------------------------------------------

# Split regexes, copied in meaning from llama.cpp's `llm_tokenizer_bpe` (which rewrites
# `(?i:'s|...)` as `'[sS]|...`; both mean the same). Where llama.cpp emulates `\p{Lu}`-style
# classes its regex engine lacks, the model's original `tokenizer.json` regex is used instead.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_JAIS2 = _LLAMA3.replace(
    r"\s+(?!\S)|\s+",
    r"\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)"
    r"|\s{1,2}(?!\S)|\s{1}",
)
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CJK = r"[一-龥ࠀ-一가-퟿]+"
# Letters of cased scripts; \x{...} marks the compatibility characters (Ω, K, ώ, ...) that
# Unicode normalisation would silently rewrite in the source file.
_DEEPSEEK_LATIN = (
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\x{1F7D}ᾀ-ᾴᾶ-ᾼ\x{1FBE}ῂ-ῄῆ-ῌῐ-\x{1FD3}ῖ-\x{1FDB}ῠ-Ῥῲ-ῴῶ-ῼ"
    r"ℂℇℊ-ℓℕℙ-ℝℤ\x{2126}ℨ\x{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"
)
_DEEPSEEK3 = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"
_PUNCTUATION = r"[\p{P}\$\+<=>\^~\|`]+"  # HF's `Punctuation`: Unicode P* and all ASCII punctuation
_NEWLINES = r"[^\n]+|[\n]+"


@dataclass(frozen=True)
class _PreTokenizer:
    """One llama.cpp pre-tokenizer type: its regexes and the defaults it brings.

    Attributes:
        splits: Regexes applied in order, each keeping matches and the text between them.
        after_bytes: Regexes applied after the byte-to-unicode map (HF's order for Falcon,
            whose `Digits` split runs on byte-mapped text).
        ignore_merges: A whole pre-token found in the vocabulary skips BPE (Llama 3).
        add_bos: llama.cpp's default for prepending BOS.
        byte_level: GPT-2's byte-to-unicode map; False runs BPE on raw UTF-8 with spaces as "▁"
            and `<0xXX>` tokens for bytes outside the vocabulary (Gemma 4).
    """

    splits: tuple[str, ...]
    after_bytes: tuple[str, ...] = ()
    ignore_merges: bool = False
    add_bos: bool = False
    byte_level: bool = True


_LLAMA3_PRE = _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_STARCODER_PRE = _PreTokenizer((r"\p{N}", _GPT2))  # one token per digit, then GPT-2
_GPT2_PRE = _PreTokenizer((_GPT2,))
_QWEN2_PRE = _PreTokenizer((_QWEN2,))
_SPM_BPE_PRE = _PreTokenizer((_NEWLINES,), add_bos=True, byte_level=False)

# `tokenizer.ggml.pre` -> pre-tokenizer, as llama.cpp's `llama_vocab::impl::load` groups them.
_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ),
        _LLAMA3_PRE,
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe", "chatglm-bpe"), _PreTokenizer((_LLAMA3,))),
    **dict.fromkeys(("glm4", "glm5"), _PreTokenizer((_LLAMA3,), ignore_merges=True)),
    "jais-2": _PreTokenizer((_JAIS2,)),
    "deepseek-llm": _PreTokenizer(
        (r"[\r\n]", _DEEPSEEK_LATIN, r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", _CJK, r"\p{N}+")
    ),
    "deepseek-coder": _PreTokenizer((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), _PreTokenizer(_DEEPSEEK3)),
    "falcon": _PreTokenizer((_PUNCTUATION, _GPT2), after_bytes=(r"\p{N}+", r"[0-9][0-9][0-9]")),
    **dict.fromkeys(
        (
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ),
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
            "jina-v1-en",
            "jina-v2-code",
            "roberta-bpe",
            "gigachat",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "granite-docling",
        ),
        _GPT2_PRE,
    ),
    **dict.fromkeys(
        (
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "stablelm2",
            "megrez",
            "hunyuan",
            "solar-open",
            "grok-2",
        ),
        _QWEN2_PRE,
    ),
    "qwen35": _PreTokenizer((_QWEN35,)),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), _PreTokenizer((_BLOOM,))),
    "viking": _PreTokenizer((_BLOOM, r"\p{N}")),
    "tekken": _PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _PreTokenizer((_GPT4O,))),
    **dict.fromkeys(("tiny_aya", "cohere2moe"), _PreTokenizer((r"\d{1,3}(?=(?:\d{3})*\b)", _GPT4O))),
    "spark2_5": _PreTokenizer(
        (
            _DEEPSEEK3[0],
            _DEEPSEEK3[1],
            _DEEPSEEK3[2].replace(r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|", r"| ?[\p{P}\p{S}]+|[\r\n]|"),
            r"\p{N}",
        )
    ),
    "youtu": _PreTokenizer(
        (
            r"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+",
            _GPT4O.replace(r"\p{N}{1,3}", r"\p{N}"),
        ),
        ignore_merges=True,
    ),
    "chameleon": _PreTokenizer(
        (
            r"<sentinel:[0-9]+>",
            r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
            r"([\t\n]|    |  )",
            r"\p{N}",
            r"[\p{P}!-/:-@\[-`{-~]",
            _GPT2,
        ),
        add_bos=True,
    ),
    **dict.fromkeys(
        ("bailingmoe", "bailingmoe2", "llada-moe"),
        _PreTokenizer(
            (
                r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
            )
        ),
    ),
    "seed-coder": _PreTokenizer(
        (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",)
    ),
    "ufakzeka": _PreTokenizer((_QWEN2.removeprefix(_CONTRACTIONS + "|"),)),
    "laguna": _PreTokenizer((_NEWLINES, _QWEN2)),
    "exaone-moe": _PreTokenizer(
        (
            _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",
        )
    ),
    "minicpm5": _PreTokenizer((r"\p{N}{1,3}", _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}+")), ignore_merges=True),
    **dict.fromkeys(("gemma4", "granite-embed-multi-311m", "sarvam-moe"), _SPM_BPE_PRE),
}

_MODELS = ("gpt2", "llama", "gemma4", "bert", "t5")


@dataclass
class GGUFVocab:
    """The tokenizer a GGUF file describes.

    Attributes:
        tokenizer: Encodes like the model's reference tokenizer; its post-processor adds BOS/EOS
            (and BERT's [SEP]) when `add_special_tokens=True` and the file asks for them.
        bos_token_id: `tokenizer.ggml.bos_token_id` (BERT: `cls_token_id`), or None.
        eos_token_id: `tokenizer.ggml.eos_token_id`, or None.
        pad_token_id: `tokenizer.ggml.padding_token_id`, or None.
        unk_token_id: `tokenizer.ggml.unknown_token_id`, or None.
        add_bos_token: Whether encoding prepends BOS (file flag, else llama.cpp's default).
        add_eos_token: Whether encoding appends EOS.
        chat_template: `tokenizer.chat_template` (Jinja2), or None.
        special_tokens: Tokens typed CONTROL, USER_DEFINED or UNKNOWN, in id order.
        sep_token_id: `tokenizer.ggml.seperator_token_id` (sic), or None.
        add_sep_token: Whether encoding appends SEP (BERT).
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
    sep_token_id: int | None = None
    add_sep_token: bool = False


# --- models ----------------------------------------------------------------------------------------


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


def _splits(regexes: tuple[str, ...]) -> list[pre_tokenizers.PreTokenizer]:
    return [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]


def _bpe_tokenizer(
    path: Path, vocab: dict[str, int], pre_name: str, merges: list[str]
) -> tuple[tokenizers.Tokenizer, bool]:
    """BPE split by `pre_name`'s regexes; returns the tokenizer and llama.cpp's default add_bos."""
    pre = _PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise UnsupportedModelError(f"{path}: tokenizer.ggml.pre is {pre_name!r}; supported: {sorted(_PRE_TOKENIZERS)}")
    pairs = _bpe_merges(path, merges)
    if pre.byte_level:
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([*_splits(pre.splits), byte_level, *_splits(pre.after_bytes)])
        tok.decoder = decoders.ByteLevel()
        return tok, pre.add_bos
    # raw UTF-8 BPE: "▁" for spaces, `<0xXX>` tokens for bytes that no merge reaches
    bpe = models.BPE(vocab=vocab, merges=pairs, byte_fallback=True, ignore_merges=pre.ignore_merges)
    tok = tokenizers.Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Sequence(_splits(pre.splits))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
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


def _wordpiece_tokenizer(
    path: Path, tokens: list[str], types: list[int], unk: str | None, lowercase: bool, strip_accents: bool
) -> tokenizers.Tokenizer:
    """BERT's WordPiece: normaliser, whitespace-and-punctuation split, greedy longest match.

    llama.cpp's converter wrote word-initial pieces as "▁x", continuations as "x" and bracketed
    tokens ("[CLS]", "[unused0]") unchanged; this is undone to BERT's "x" / "##x".
    """
    if unk is None:
        raise CheckpointError(
            f"{path}: a 'bert' tokenizer needs tokenizer.ggml.unknown_token_id (llama.cpp's default, 100, "
            f"is past the {len(tokens)} tokens)"
        )
    vocab = {}
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (_CONTROL, _UNKNOWN, _USER_DEFINED) or (tok.startswith("[") and tok.endswith("]")):
            vocab[tok] = i
        elif tok.startswith("▁"):
            vocab[tok[1:]] = i
        else:
            vocab["##" + tok] = i
    tok = tokenizers.Tokenizer(models.WordPiece(vocab=vocab, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tok


def _unigram_tokenizer(
    tokens: list[str],
    scores: list[float],
    unk_id: int | None,
    charsmap: list[int] | None,
    add_space_prefix: bool,
    remove_extra_whitespaces: bool,
) -> tokenizers.Tokenizer:
    """SentencePiece unigram: precompiled normalisation, "▁" for spaces, best-scoring segmentation.

    The charsmap is SentencePiece's compiled NFKC-style rules; `remove_extra_whitespaces` trims
    the text and collapses runs of spaces, as SentencePiece's normaliser does.
    """
    tok = tokenizers.Tokenizer(models.Unigram([(t, float(s)) for t, s in zip(tokens, scores, strict=True)], unk_id))
    steps = []
    if charsmap:
        steps.append(normalizers.Precompiled(bytes(bytearray(v & 0xFF for v in charsmap))))
    if remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    tok.normalizer = normalizers.Sequence(steps)
    scheme = "always" if add_space_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
    return tok


def _post_processor(tokens: list[str], head: list[int], tail: list[int]) -> processors.TemplateProcessing | None:
    """BOS/EOS/SEP around each sequence, as llama.cpp's `tokenize(..., add_special=true)`."""
    if not (head or tail):
        return None
    first = [tokens[i] for i in head]
    last = [tokens[i] for i in tail]
    return processors.TemplateProcessing(
        single=[*first, "$A", *last],
        pair=[*first, "$A", *last, *first, "$B:1", *[f"{t}:1" for t in last]],
        special_tokens=sorted({tokens[i]: i for i in head + tail}.items(), key=lambda kv: kv[1]),
    )


# --- entry point -----------------------------------------------------------------------------------


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
    fields = _read_metadata(path)

    def get(key: str, default: Any = _MISSING) -> Any:
        return _field(fields, path, key, default)

    model = get("tokenizer.ggml.model")
    if model not in _MODELS:
        raise UnsupportedModelError(f"{path}: tokenizer.ggml.model is {model!r}; supported: {list(_MODELS)}")
    tokens = [tok or f"[EMPTY_{i}]" for i, tok in enumerate(get("tokenizer.ggml.tokens"))]
    n = len(tokens)
    types = get("tokenizer.ggml.token_type", None) or [_NORMAL] * n
    if len(types) != n:
        raise CheckpointError(
            f"{path}: tokenizer.ggml.token_type has {len(types)} entries, expected {n} (one per token)"
        )
    ids = {}
    for key in ("bos", "eos", "padding", "unknown", "seperator", "cls"):
        value = get(f"tokenizer.ggml.{key}_token_id", None)
        if value is not None and not 0 <= int(value) < n:
            raise CheckpointError(
                f"{path}: tokenizer.ggml.{key}_token_id is {value}, expected an id below the vocabulary size {n}"
            )
        ids[key] = None if value is None else int(value)

    def scores() -> list[float]:
        values = get("tokenizer.ggml.scores", None)
        if values is None or len(values) != n:
            found = "missing" if values is None else f"{len(values)} entries"
            raise CheckpointError(
                f"{path}: tokenizer.ggml.scores is {found}, expected {n} (one per token) for a {model!r} tokenizer"
            )
        return values

    vocab = {tok: i for i, tok in enumerate(tokens)}  # a repeated string keeps its last id
    if model == "bert":  # llama.cpp's ids for a BERT vocabulary that does not name them
        for key, default in (("unknown", 100), ("cls", 101), ("seperator", 102)):
            if ids[key] is None and default < n:
                ids[key] = default
        if ids["bos"] is None:
            ids["bos"] = ids["cls"]
    unk = None if ids["unknown"] is None else tokens[ids["unknown"]]
    default_eos = add_sep = False
    if model in ("gpt2", "gemma4"):
        merges = get("tokenizer.ggml.merges", None)
        if merges is None:
            raise CheckpointError(f"{path}: tokenizer.ggml.merges is missing; a {model!r} tokenizer needs its merges")
        pre_name = "gemma4" if model == "gemma4" else get("tokenizer.ggml.pre", "default")
        tok, default_bos = _bpe_tokenizer(path, vocab, pre_name, merges)
    elif model == "llama":
        add_space_prefix = bool(get("tokenizer.ggml.add_space_prefix", True))
        tok = _sentencepiece_tokenizer(vocab, tokens, scores(), types, unk, add_space_prefix)
        default_bos = True
    elif model == "bert":
        lowercase = bool(get("tokenizer.ggml.normalizer.lowercase", True))
        strip_accents = bool(get("tokenizer.ggml.normalizer.strip_accents", lowercase))
        tok = _wordpiece_tokenizer(path, tokens, types, unk, lowercase, strip_accents)
        default_bos = add_sep = True
    else:
        tok = _unigram_tokenizer(
            tokens,
            scores(),
            ids["unknown"],
            get("tokenizer.ggml.precompiled_charsmap", None),
            bool(get("tokenizer.ggml.add_space_prefix", True)),
            bool(get("tokenizer.ggml.remove_extra_whitespaces", False)),
        )
        default_bos, default_eos = False, True

    whole = [i for i, kind in enumerate(types) if kind in (_CONTROL, _UNKNOWN, _USER_DEFINED)]
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in whole if types[i] != _USER_DEFINED]
    )
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in whole if types[i] == _USER_DEFINED])

    add_bos = bool(get("tokenizer.ggml.add_bos_token", default_bos))
    add_eos = bool(get("tokenizer.ggml.add_eos_token", default_eos))
    add_sep = bool(get("tokenizer.ggml.add_sep_token", add_sep)) and model == "bert"
    for flag, on, key in (
        ("add_bos_token", add_bos, "bos"),
        ("add_eos_token", add_eos, "eos"),
        ("add_sep_token", add_sep, "seperator"),
    ):
        if on and ids[key] is None:
            raise CheckpointError(f"{path}: tokenizer.ggml.{flag} is true but tokenizer.ggml.{key}_token_id is missing")
    head = [ids["bos"]] if add_bos else []
    tail = ([ids["eos"]] if add_eos else []) + ([ids["seperator"]] if add_sep else [])
    tok.post_processor = _post_processor(tokens, head, tail)
    return GGUFVocab(
        tokenizer=tok,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["padding"],
        unk_token_id=ids["unknown"],
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        chat_template=get("tokenizer.chat_template", None),
        special_tokens=[tokens[i] for i in whole],
        sep_token_id=ids["seperator"],
        add_sep_token=add_sep,
    )
