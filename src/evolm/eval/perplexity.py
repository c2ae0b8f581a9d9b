"""Perplexity and bits per byte of texts longer than the context, by a strided sliding window.

The recipe is Hugging Face's "Perplexity of fixed-length models": windows of ``max_length``
tokens start every ``stride`` tokens, and a window scores only the tokens that no earlier window
scored, so every scored token sees at least ``max_length - stride`` tokens of context (the first
window aside)::

    tokens      0 1 2 3 4 5 6 7 8 9            max_length = 6, stride = 3
    window 1    [0 1 2 3 4 5]                  scores 1..5 (token 0 has no context)
    window 2          [3 4 5 6 7 8]            scores 6..8
    window 3                [6 7 8 9]          scores 9

A smaller stride gives more context per prediction (a lower, truer perplexity) at the cost of
``max_length / stride`` times the compute. When ``stride == max_length`` the first token of every
window has no context and is not scored, exactly as in the recipe.

Documents are scored separately, each prefixed by the BOS token (EOS where there is no BOS, as
lm-eval's rolling log-likelihood does) so that its first token is scored too. Then::

    perplexity    = exp(total NLL / scored tokens)
    bits per byte = total NLL / ln 2 / UTF-8 bytes of the scored text

Bits per byte (Gao et al., 2020, The Pile) does not depend on the tokenizer, so models with
different vocabularies compare.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from evolm.errors import ConfigError
from evolm.nn.losses import IGNORE_INDEX, token_logprobs


@dataclass(frozen=True)
class Window:
    """One forward of the strided recipe over a token sequence.

    Attributes:
        begin: First token of the window.
        end: One past its last token.
        first_scored: First token whose log-probability this window contributes; tokens
            ``first_scored .. end - 1`` are scored, each predicted from the tokens before it in the window.
    """

    begin: int
    end: int
    first_scored: int


def strided_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The windows of Hugging Face's strided perplexity recipe over ``n_tokens`` tokens.

    Args:
        n_tokens: Length of the sequence.
        max_length: Tokens per window (at most the model's context).
        stride: Step between window starts, ``1 <= stride <= max_length``.

    Returns:
        Windows in order; together they score tokens ``1 .. n_tokens - 1`` except, when
        ``stride == max_length``, each window's first token.
    """
    if max_length < 2:
        raise ConfigError(f"max_length={max_length}; a window needs at least 2 tokens")
    if not 1 <= stride <= max_length:
        raise ConfigError(f"stride={stride}; must be in [1, max_length={max_length}]")
    windows, prev_end = [], 0
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + max_length, n_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@dataclass(frozen=True)
class PerplexityResult:
    """Summed negative log-likelihood over documents and what it was summed over.

    Attributes:
        nll: Total negative log-likelihood, nats.
        tokens: Tokens scored.
        bytes: UTF-8 bytes of the text those tokens spell (0 when scoring ids only).
        documents: Documents scored.
        forwards: Windows run through the model.
    """

    nll: float
    tokens: int
    bytes: int = 0
    documents: int = 0
    forwards: int = 0

    @property
    def perplexity(self) -> float:
        """``exp(nll / tokens)``."""
        return math.exp(self.nll / self.tokens) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        """``nll / ln 2 / bytes``."""
        return self.nll / math.log(2) / self.bytes if self.bytes else math.nan

    def to_dict(self) -> dict:
        """The fields and the derived metrics, for a results file."""
        return {
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "nll": self.nll,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
            "forwards": self.forwards,
        }


def _check_lengths(model: nn.Module, max_length: int | None, stride: int | None) -> tuple[int, int]:
    limit = model.cfg.max_seq_len
    max_length = limit if max_length is None else max_length
    if max_length > limit:
        raise ConfigError(f"max_length={max_length} exceeds the model's context length max_seq_len={limit}")
    stride = max_length // 2 if stride is None else stride
    strided_windows(0, max_length, stride)  # validates both
    return max_length, stride


@torch.inference_mode()
def sequence_nll(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Summed NLL of token sequences under the strided recipe; windows of all sequences are batched.

    Args:
        model: A causal LM.
        sequences: Token ids; the first id of each is context only (put BOS there).
        max_length: Tokens per window; default the model's context length.
        stride: Step between windows; default ``max_length // 2``.
        batch_size: Windows per forward (right-padded; causal attention keeps padding invisible).
        progress: Called with the number of windows done after each forward.

    Returns:
        The total (``bytes`` left 0).
    """
    max_length, stride = _check_lengths(model, max_length, stride)
    device = model.lm_head.weight.device
    jobs = [(seq, w) for seq in sequences for w in strided_windows(len(seq), max_length, stride)]
    jobs.sort(key=lambda j: j[1].end - j[1].begin, reverse=True)  # full windows together
    nll, tokens = 0.0, 0
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        width = max(w.end - w.begin for _, w in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, W)
        labels = torch.full((len(chunk), width - 1), IGNORE_INDEX, dtype=torch.long)  # (B, W-1): ids[:, 1:]
        for b, (seq, w) in enumerate(chunk):
            window = torch.as_tensor(seq[w.begin : w.end], dtype=torch.long)
            ids[b, : len(window)] = window
            k = w.first_scored - w.begin  # window position of the first scored token
            labels[b, k - 1 : len(window) - 1] = window[k:]
        logits = model(ids.to(device))[:, :-1]  # (B, W-1, V): position t predicts token t+1
        logp = token_logprobs(logits, labels.to(device))
        nll -= float(logp.sum())
        tokens += int((labels != IGNORE_INDEX).sum())
        if progress is not None:
            progress(len(chunk))
    return PerplexityResult(nll=nll, tokens=tokens, documents=len(sequences), forwards=len(jobs))


def prefix_token(tokenizer) -> int | None:
    """The id put before a document so its first token is scored: BOS, else EOS, else None."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def document_tokens(tokenizer, text: str) -> tuple[list[int], int]:
    """Ids of ``text`` behind the prefix token, and the UTF-8 bytes the scored ids spell.

    Without a BOS or EOS token the first token cannot be scored; its bytes are then left out.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    n_bytes = len(text.encode("utf-8"))
    prefix = prefix_token(tokenizer)
    if prefix is not None:
        return [prefix, *ids], n_bytes
    if ids:
        n_bytes -= len(tokenizer.decode(ids[:1]).encode("utf-8"))
    return ids, n_bytes


def tokenize_documents(tokenizer, texts: Iterable[str], max_tokens: int | None = None) -> tuple[list[list[int]], int]:
    """Token sequences of documents (``document_tokens``) and the bytes they spell.

    Args:
        tokenizer: An ``evolm.Tokenizer``.
        texts: Documents; ones of fewer than 2 tokens (nothing to score) are left out.
        max_tokens: Keep at most this many tokens in all (the last document is cut, its bytes
            counted from the tokens kept); None keeps everything.

    Returns:
        ``(sequences, n_bytes)``.
    """
    if tokenizer is None:
        raise ConfigError("perplexity needs the model's tokenizer to turn text into ids")
    sequences, n_bytes, budget = [], 0, max_tokens
    for text in texts:
        if budget is not None and budget <= 0:
            break
        ids, b = document_tokens(tokenizer, text)
        if budget is not None and len(ids) > budget:
            ids = ids[:budget]
            first = 1 if prefix_token(tokenizer) is not None else 0
            b = len(tokenizer.decode(ids[first:]).encode("utf-8"))
        if len(ids) < 2:
            continue
        sequences.append(ids)
        n_bytes += b
        if budget is not None:
            budget -= len(ids)
    return sequences, n_bytes


def perplexity(
    model: nn.Module,
    tokenizer,
    texts: Iterable[str],
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity and bits per byte of documents, each scored separately by the strided recipe.

    Args:
        model: A causal LM.
        tokenizer: Its ``evolm.Tokenizer``.
        texts: Documents.
        max_length: Tokens per window; default the model's context length.
        stride: Step between windows; default ``max_length // 2``.
        batch_size: Windows per forward.
        max_tokens: Score at most this many tokens in all (see ``tokenize_documents``).
        progress: Called with the number of windows done after each forward.

    Returns:
        NLL, token and byte counts; ``.perplexity`` and ``.bits_per_byte``.
    """
    sequences, n_bytes = tokenize_documents(tokenizer, texts, max_tokens)
    result = sequence_nll(model, sequences, max_length, stride, batch_size, progress)
    return dataclasses.replace(result, bytes=n_bytes)


def count_windows(lengths: Iterable[int], model: nn.Module, max_length: int | None, stride: int | None) -> int:
    """How many forwards ``sequence_nll`` runs for sequences of these lengths (for a progress bar)."""
    max_length, stride = _check_lengths(model, max_length, stride)
    return sum(len(strided_windows(n, max_length, stride)) for n in lengths)
