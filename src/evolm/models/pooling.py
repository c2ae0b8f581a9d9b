"""Sentence embeddings from an encoder: mean pooling over real tokens, then L2 normalisation.

This is Sentence-BERT's recipe (Reimers & Gurevych, 2019) as the ``all-*`` sentence-transformers
models use it: the average of the last hidden states of the non-padding tokens, scaled to unit
length so that a dot product is the cosine similarity.

Notation: B batch, T tokens, C hidden width, N texts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import tokenizers
import torch
from torch import nn
from torch.nn import functional as F

from evolm.errors import ConfigError

if TYPE_CHECKING:
    from evolm.tokenizer import Tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the hidden states of real tokens.

    Args:
        hidden: (B, T, C) hidden states.
        attention_mask: (B, T), 1 for real tokens and 0 for padding.

    Returns:
        (B, C) float32; a row without real tokens is all zeros.
    """
    m = attention_mask.to(torch.float32)[..., None]  # (B, T, 1)
    total = (hidden.float() * m).sum(dim=1)  # (B, C)
    return total / m.sum(dim=1).clamp_min(1e-9)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Scale each row of (N, C) ``x`` to unit L2 norm (a zero row stays zero)."""
    return F.normalize(x, p=2.0, dim=-1)


def _plain_tokenizer(tokenizer: Tokenizer, max_length: int) -> Tokenizer:
    """``tokenizer`` without the padding its ``tokenizer.json`` may fix (we pad per batch), truncating
    to ``max_length`` tokens special tokens included, as transformers' tokenizers do."""
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    backend.no_padding()
    backend.enable_truncation(max_length)
    return dataclasses.replace(tokenizer, backend=backend)


@torch.inference_mode()
def embed(
    model: nn.Module,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    normalized: bool = True,
) -> torch.Tensor:
    """Sentence embeddings of ``texts``.

    Args:
        model: An evolm encoder (any head; its backbone ``model.model`` is used).
        tokenizer: Its tokenizer (BERT's adds ``[CLS]``/``[SEP]`` itself).
        texts: The sentences.
        batch_size: Texts per forward pass.
        max_length: Truncate longer texts to this many tokens (default: the model's maximum).
        normalized: Scale every embedding to unit length.

    Returns:
        (N, C) float32 on the model's device.

    Raises:
        ConfigError: ``texts`` is a bare string or ``max_length`` exceeds the model's positions.
    """
    if isinstance(texts, str):
        raise ConfigError("embed takes a list of texts; got a single string (wrap it: [text])")
    cfg = model.cfg
    limit = cfg.max_seq_len if max_length is None else max_length
    if not 0 < limit <= cfg.max_seq_len:
        raise ConfigError(f"max_length={max_length}; must be in 1..{cfg.max_seq_len} (the model's positions)")
    tok = _plain_tokenizer(tokenizer, limit)
    pad = getattr(cfg, "pad_token_id", None)
    pad = pad if pad is not None else (tokenizer.pad_token_id or 0)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        rows = [tok.encode(t) for t in texts[i : i + batch_size]]
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(rows), t, dtype=torch.long)  # (B, T)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        out.append(mean_pool(model.model(ids, attention_mask=mask), mask))
    if not out:
        return torch.zeros(0, cfg.hidden_size, device=device)
    emb = torch.cat(out)  # (N, C)
    return normalize(emb) if normalized else emb
