"""Text-to-text generation with encoder-decoder models: encode once, decode over explicit caches.

The source is encoded once; every decoder layer projects the encoder output to keys and values
once (``CrossCache``) and grows a self-attention ``KVCache`` by one token per step. Two searches:

* ``greedy_search``: the most likely next token at each step.
* ``beam_search``: beam search (Graves, 2012; Sutskever et al., 2014) scored as transformers 5
  scores it, so that outputs match ``generate(num_beams=..., length_penalty=..., early_stopping=...)``
  token for token:

  - each step keeps the ``2 * num_beams`` best continuations of all live beams (by summed log
    probability), the best ``num_beams`` that did not just end continue;
  - a continuation among the top ``num_beams`` that ends (EOS, or the length limit) becomes a
    finished hypothesis scored ``sum_logprob / generated_len ** length_penalty`` (the EOS token
    counted; Wu et al., 2016 use a similar normalisation), and the ``num_beams`` best are kept;
  - ``early_stopping=True`` stops an input once it has ``num_beams`` finished hypotheses;
    ``False`` stops when the best live beam, scored at its current length, cannot beat the
    worst finished one; ``"never"`` does the same but, for ``length_penalty > 0``, scores the
    live beam at the longest length it could reach (the canonical, exact stopping rule).

Outputs start with ``decoder_start_token_id`` and are padded (finished rows, shorter beams) as
transformers pads them.

Notation: B batch, N beams, V vocabulary, L = 1 + max_new_tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from evolm.errors import ConfigError
from evolm.infer.generate import check_inputs, eos_id_list

_NEG = -1.0e9  # score of impossible or discarded hypotheses (transformers uses the same constant)


def _validate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, attention_mask) -> None:
    cfg = getattr(model, "cfg", None)
    if not getattr(cfg, "is_encoder_decoder", False):
        raise ConfigError(
            "seq2seq generation needs an encoder-decoder model (t5, bart, transformer); "
            "use evolm.infer.generate.generate for decoder-only models"
        )
    check_inputs(input_ids, max_new_tokens, cfg.vocab_size, attention_mask, "source")
    if 1 + max_new_tokens > cfg.max_seq_len:
        raise ConfigError(
            f"1 start token + max_new_tokens={max_new_tokens} exceeds the decoder's max_seq_len={cfg.max_seq_len}"
        )


def _start(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, beams: int, length: int):
    """Encode once, repeat each input ``beams`` times (rows b*N + n), build the decoder caches."""
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    mask = attention_mask.to(device) if attention_mask is not None else None
    memory = model.encode(input_ids, mask)  # (B, S, C)
    if beams > 1:
        memory = memory.repeat_interleave(beams, dim=0)  # (B*N, S, C)
        mask = mask.repeat_interleave(beams, dim=0) if mask is not None else None
    return model.new_decoder_cache(memory, mask, max_len=length), device


def _step(model: nn.Module, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Next-token log-probabilities (rows, V), float32, after feeding ``tokens`` (rows,)."""
    logits = model(decoder_input_ids=tokens[:, None], cache=cache)[:, -1]
    return F.log_softmax(logits.float(), dim=-1)


@torch.inference_mode()
def greedy_search(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Greedy decoding; arguments as ``generate_seq2seq``. Returns (B, 1 + n), n <= max_new_tokens."""
    cfg = model.cfg
    _validate(model, input_ids, max_new_tokens, attention_mask)
    eos = eos_id_list(cfg.eos_token_id if eos_token_id is None else eos_token_id)
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    b = input_ids.shape[0]
    cache, device = _start(model, input_ids, attention_mask, 1, 1 + max_new_tokens)
    tokens = torch.full((b, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
    eos_t = torch.tensor(eos, device=device)
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        nxt = _step(model, tokens[:, -1], cache).argmax(-1)  # (B,)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if eos:
            unfinished &= ~torch.isin(nxt, eos_t)
            if not bool(unfinished.any()):
                break
    return tokens


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, M) of ``t`` (B, N, ...) along the beam dimension: (B, M, ...)."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


@torch.inference_mode()
def beam_search(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    num_beams: int,
    *,
    length_penalty: float = 1.0,
    early_stopping: bool | Literal["never"] = False,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    num_return_sequences: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search; arguments as ``generate_seq2seq``.

    Returns:
        ``(sequences, scores)``: (B * R, 1 + n) tokens and (B * R,) length-penalised scores of the
        R = ``num_return_sequences`` best hypotheses of each input, best first.
    """
    cfg = model.cfg
    _validate(model, input_ids, max_new_tokens, attention_mask)
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ConfigError(f"num_beams={num_beams}; must be a positive integer")
    if not 1 <= num_return_sequences <= num_beams:
        raise ConfigError(f"num_return_sequences={num_return_sequences}; must be in [1, num_beams={num_beams}]")
    if early_stopping not in (True, False, "never"):
        raise ConfigError(f"early_stopping={early_stopping!r}; allowed: True, False, 'never'")
    eos = eos_id_list(cfg.eos_token_id if eos_token_id is None else eos_token_id)
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    fill = (pad or eos[0]) if eos else -1  # transformers' fill: a pad id of 0 falls back to EOS
    b, n, length = input_ids.shape[0], num_beams, 1 + max_new_tokens
    keep = max(2, 1 + len(eos)) * n  # continuations kept per step: enough that N survive all ending
    cache, device = _start(model, input_ids, attention_mask, n, length)
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    top_n = torch.arange(keep, device=device) < n  # (K,): only these may become finished hypotheses

    running = torch.full((b, n, length), fill, dtype=torch.long, device=device)
    running[:, :, 0] = cfg.decoder_start_token_id
    running_scores = torch.full((b, n), _NEG, device=device)
    running_scores[:, 0] = 0.0  # identical beams at the start: only the first may expand
    running_parent = torch.full((b, n, length - 1), -1, dtype=torch.long, device=device)  # flat parent per step
    done, done_scores = running.clone(), torch.full((b, n), _NEG, device=device)
    done_parent, is_done = running_parent.clone(), torch.zeros((b, n), dtype=torch.bool, device=device)
    improvable = torch.ones((b, 1), dtype=torch.bool, device=device)
    row_offset = torch.arange(b, device=device)[:, None] * n  # (B, 1)

    cur = 1  # tokens in every running sequence
    while True:
        logp = _step(model, running[:, :, cur - 1].reshape(b * n), cache)  # (B*N, V)
        v = logp.shape[-1]
        total = (logp.view(b, n, v) + running_scores[:, :, None]).view(b, n * v)  # (B, N*V)

        # the K best continuations over all beams of each input
        cand_scores, cand = torch.topk(total, keep)  # (B, K)
        parent = cand // v
        cand_seqs = _gather(running, parent)  # (B, K, L)
        cand_seqs[:, :, cur] = cand % v
        cand_parent = _gather(running_parent, parent)
        cand_parent[:, :, cur - 1] = parent + row_offset
        ends = torch.isin(cand % v, eos_t) | (cur + 1 >= length)  # (B, K)

        # the N best that did not end continue
        live_scores = cand_scores + ends.float() * _NEG
        pick = torch.topk(live_scores, n).indices
        running, running_scores = _gather(cand_seqs, pick), _gather(live_scores, pick)
        running_parent = _gather(cand_parent, pick)

        # those among the top N that ended compete for the N finished slots
        finished_scores = cand_scores / (cur**length_penalty)  # generated tokens, EOS included
        full = is_done.all(dim=-1, keepdim=True) & (early_stopping is True)
        finished_scores = finished_scores + full.float() * _NEG
        finished_scores = finished_scores + (~improvable).float() * _NEG
        just_ended = ends & top_n[None, :]
        finished_scores = finished_scores + (~just_ended).float() * _NEG
        merged = torch.cat([done_scores, finished_scores], dim=1)  # (B, N + K)
        best = torch.topk(merged, n).indices
        done = _gather(torch.cat([done, cand_seqs], dim=1), best)
        done_scores = _gather(merged, best)
        done_parent = _gather(torch.cat([done_parent, cand_parent], dim=1), best)
        is_done = _gather(torch.cat([is_done, just_ended], dim=1), best)

        cache.reorder(running_parent[:, :, cur - 1].reshape(b * n))
        cur += 1

        # can a live beam still beat the worst finished hypothesis?
        reach = length - 1 if early_stopping == "never" and length_penalty > 0.0 else cur - 1
        best_live = running_scores[:, :1] / (reach**length_penalty)
        worst_done = torch.where(is_done, done_scores.min(dim=1, keepdim=True).values, _NEG)
        improvable = improvable & (best_live > worst_done).any(dim=-1, keepdim=True)
        all_full = bool(is_done.all()) and early_stopping is True
        if not bool(improvable.any()) or all_full or bool(ends.all()):
            break

    r = num_return_sequences
    sequences = done[:, :r].reshape(b * r, length)
    scores = done_scores[:, :r].reshape(b * r)
    generated = int((done_parent[:, :r] >= 0).sum(dim=-1).max())  # longest returned hypothesis
    return sequences[:, : 1 + generated], scores


def generate_seq2seq(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | Literal["never"] = False,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    num_return_sequences: int = 1,
) -> torch.Tensor:
    """Generate target sequences for source ``input_ids`` with an encoder-decoder model.

    Args:
        model: A ``Seq2SeqLM`` (``evolm.load_model`` of a T5/BART checkpoint, ``build_model``).
        input_ids: (B, S) source tokens (padded rows marked by ``attention_mask``).
        max_new_tokens: Most tokens generated after the decoder start token (> 0).
        num_beams: 1 is greedy search; more is beam search.
        length_penalty: Exponent of the length in a finished hypothesis' score
            ``sum_logprob / len ** length_penalty`` (> 0 favours longer outputs).
        early_stopping: ``True``, ``False`` or ``"never"``, as in transformers (module docstring).
        attention_mask: (B, S) 1 for real source tokens, 0 for padding.
        eos_token_id: Id(s) that end a hypothesis (default the model's ``eos_token_id``).
        pad_token_id: Fill of finished rows (default the model's ``pad_token_id``).
        num_return_sequences: Hypotheses returned per input (beam search), best first.

    Returns:
        (B * num_return_sequences, 1 + n) LongTensor starting with ``decoder_start_token_id``.
    """
    if num_beams == 1:
        if num_return_sequences != 1:
            raise ConfigError("num_return_sequences > 1 needs beam search (num_beams > 1)")
        return greedy_search(
            model,
            input_ids,
            max_new_tokens,
            attention_mask=attention_mask,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
    sequences, _ = beam_search(
        model,
        input_ids,
        max_new_tokens,
        num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        attention_mask=attention_mask,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        num_return_sequences=num_return_sequences,
    )
    return sequences
