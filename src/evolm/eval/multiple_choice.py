"""Multiple-choice evaluation by log-likelihood (Brown et al., 2020, GPT-3, section 2.4).

A question is a *context* (the prompt, with k solved examples first for k-shot) and a list of
*choices*. The model never generates: each choice is scored by the log-probability of its tokens
after the context, and the highest-scoring choice is the model's answer. Two scores are reported,
as EleutherAI's lm-evaluation-harness does:

* ``acc``: the choice with the largest summed log-likelihood ``sum_t log p(c_t | context, c_<t)``;
* ``acc_norm``: the same divided by the choice's length in *characters* (lm-eval's ``acc_norm``),
  which removes the bias towards short answers when choices are free text.

Tokenization follows lm-eval: trailing whitespace of the context moves to the continuation, then
the context and the whole ``context + continuation`` are encoded and the continuation's ids are the
tail of the whole, so merges across the boundary are those the model saw in training.

``loglikelihoods`` is the batched engine (also behind the lm-eval adapter): requests that share a
context run the context once. Up to ``batch_size`` distinct contexts are left-padded into one
forward that fills a KV cache; the cache rows are then repeated once per continuation and every
continuation of the batch runs in a second forward, right-padded. When every continuation is a
single token (MMLU's " A"/" B"/...), the first forward alone gives all scores.

Notation: C contexts in a batch, L longest context, R continuation rows, T longest continuation,
V vocabulary.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from evolm.errors import ConfigError
from evolm.nn.losses import IGNORE_INDEX, token_logprobs

Progress = Callable[[int], None]


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question, already formatted as a prompt.

    Attributes:
        context: The prompt the choices continue (k-shot examples included).
        choices: Continuation strings, with their leading space where the format has one (``" A"``).
        scores: Grade of each choice: 1.0 for correct, 0.0 for wrong (BIG-bench may grade partially).
        group: Subject or task name, for per-group accuracy.
        length: Length of each choice used by ``acc_norm`` (characters); default ``len(choice)``.
    """

    context: str
    choices: tuple[str, ...]
    scores: tuple[float, ...]
    group: str = ""
    length: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ConfigError(f"a multiple-choice item needs at least 2 choices; got {len(self.choices)}")
        if len(self.scores) != len(self.choices):
            raise ConfigError(f"{len(self.choices)} choices but {len(self.scores)} scores")

    @property
    def gold(self) -> int:
        """Index of the best choice (the first one of the highest score)."""
        return max(range(len(self.scores)), key=lambda i: (self.scores[i], -i))


@dataclass(frozen=True)
class MCScore:
    """The model's reading of one ``MCItem``.

    Attributes:
        logprobs: Summed log-likelihood of each choice.
        pred: Index of the choice with the largest log-likelihood.
        pred_norm: Index of the choice with the largest log-likelihood per character.
        acc: Grade of ``pred`` (``item.scores[pred]``).
        acc_norm: Grade of ``pred_norm``.
    """

    logprobs: tuple[float, ...]
    pred: int
    pred_norm: int
    acc: float
    acc_norm: float


def split_context(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and of its continuation, encoded as lm-eval does.

    Trailing whitespace of ``context`` is moved to the front of ``continuation``; the continuation's
    ids are those of ``context + continuation`` after the first ``len(encode(context))``.

    Args:
        tokenizer: An ``evolm.Tokenizer`` (``encode`` adds BOS where the model expects it).
        context: Non-empty prompt.
        continuation: Text to score.

    Returns:
        ``(context_ids, continuation_ids)``.
    """
    if not context:
        raise ConfigError("empty context: give at least one character of prompt (or score with a BOS context)")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    return context_ids, whole[len(context_ids) :]


def _repeat_cache_rows(cache: list, index: torch.Tensor, batch: int) -> list:
    """Per-layer caches whose row ``r`` is row ``index[r]`` of ``cache``.

    Every evolm cache (``KVCache``, ``RollingKVCache``, ``LatentCache``) keeps its per-row state in
    tensors whose first dimension is the batch; other tensors (slot indices) are shared by all rows
    and are copied as they are.
    """
    out = []
    for layer_cache in cache:
        new = copy.copy(layer_cache)
        for name, value in vars(layer_cache).items():
            if isinstance(value, torch.Tensor):
                is_rows = value.dim() >= 3 and value.shape[0] == batch
                setattr(new, name, value.index_select(0, index) if is_rows else value.clone())
        out.append(new)
    return out


def _left_pad(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(C, L) ids right-aligned with 0 as filler, and the (C, L) 0/1 mask (None when nothing is padded)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # built on the CPU, moved once
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), (None if bool(mask.all()) else mask.to(device))


@torch.inference_mode()
def loglikelihoods(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
    progress: Progress | None = None,
) -> list[tuple[float, bool]]:
    """log p(continuation | context) of each request, and whether greedy decoding would produce it.

    The model reads ``context + continuation[:-1]``; when that exceeds its window the context loses
    its oldest tokens (the continuation is kept whole), as lm-eval does.

    Args:
        model: A causal LM (``model(ids) -> (B, T, V)`` logits, ``model.new_cache``).
        requests: ``(context_ids, continuation_ids)`` pairs; contexts must be non-empty.
        batch_size: Distinct contexts per forward.
        progress: Called with the number of requests finished after each batch.

    Returns:
        One ``(sum of log-probabilities, is_greedy)`` per request, in order.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}; must be >= 1")
    max_len = model.cfg.max_seq_len
    device = model.lm_head.weight.device
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    by_context: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = defaultdict(list)
    for i, (ctx, cont) in enumerate(requests):
        cont = tuple(int(t) for t in cont)
        if not len(ctx):
            raise ConfigError(f"request {i} has an empty context; start it with the BOS (or EOS) token")
        if not cont:
            results[i] = (0.0, True)
            continue
        if len(cont) > max_len:
            raise ConfigError(
                f"request {i}: continuation of {len(cont)} tokens does not fit the model's window of {max_len} tokens"
            )
        ctx = tuple(int(t) for t in ctx)[-(max_len + 1 - len(cont)) :]  # the model reads ctx + cont[:-1]
        by_context[ctx].append((i, cont))
    for batch in _batches(by_context, batch_size, max_len):
        rows = [(c, i, cont) for c, ctx in enumerate(batch) for i, cont in by_context[ctx]]
        for (_, i, _), value in zip(rows, _score_batch(model, batch, rows, device), strict=True):
            results[i] = value
        if progress is not None:
            progress(len(rows))
    return results  # type: ignore[return-value]


def _batches(by_context: dict, batch_size: int, max_len: int) -> list[list[tuple[int, ...]]]:
    """Contexts, longest first (similar lengths share a batch: less padding), in batches of at most
    ``batch_size`` whose padded width fits the window: longest context + longest continuation - 1."""
    batches: list[list[tuple[int, ...]]] = []
    batch: list[tuple[int, ...]] = []
    width = longest = 0
    for ctx in sorted(by_context, key=len, reverse=True):
        t = max(len(cont) for _, cont in by_context[ctx])
        if batch and (len(batch) == batch_size or max(width, len(ctx)) + max(longest, t) - 1 > max_len):
            batches.append(batch)
            batch, width, longest = [], 0, 0
        batch.append(ctx)
        width, longest = max(width, len(ctx)), max(longest, t)
    if batch:
        batches.append(batch)
    return batches


def _score_batch(
    model: nn.Module,
    contexts: list[tuple[int, ...]],
    rows: list[tuple[int, int, tuple[int, ...]]],
    device: torch.device,
) -> list[tuple[float, bool]]:
    """Scores of ``rows`` = (context index, request index, continuation ids) over ``contexts``."""
    ids, mask = _left_pad(contexts, device)  # (C, L)
    c, width = ids.shape
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    owner = torch.tensor([r[0] for r in rows], device=device)  # (R,) context of each row
    conts = [r[2] for r in rows]
    t = max(len(x) for x in conts)
    labels = torch.full((len(rows), t), IGNORE_INDEX, dtype=torch.long)  # (R, T)
    for r, cont in enumerate(conts):
        labels[r, : len(cont)] = torch.tensor(cont, dtype=torch.long)
    labels = labels.to(device)

    if t == 1:  # every continuation is one token: the contexts' last logits are all we need
        last = model(ids, attention_mask=mask, position_ids=positions)[:, -1]  # (C, V)
        logits = last.index_select(0, owner)[:, None]  # (R, 1, V)
    else:
        cache = model.new_cache(c, width + t - 1)
        last = model(ids, attention_mask=mask, position_ids=positions, cache=cache)[:, -1]  # (C, V)
        rows_cache = _repeat_cache_rows(cache, owner, c)
        feed = labels[:, :-1].clamp(min=0)  # (R, T-1): each continuation but its last token
        lengths = torch.tensor([len(ctx) for ctx in contexts], device=device).index_select(0, owner)  # (R,)
        ctx_mask = torch.ones(c, width, dtype=torch.long, device=device) if mask is None else mask
        cont_mask = (labels[:, :-1] != IGNORE_INDEX).long()
        full_mask = torch.cat([ctx_mask.index_select(0, owner), cont_mask], dim=1)  # (R, L + T - 1)
        cont_positions = lengths[:, None] + torch.arange(t - 1, device=device)  # (R, T-1)
        rest = model(feed, attention_mask=full_mask, position_ids=cont_positions, cache=rows_cache)  # (R, T-1, V)
        logits = torch.cat([last.index_select(0, owner)[:, None], rest], dim=1)  # (R, T, V)
    logp = token_logprobs(logits, labels)  # (R, T)
    greedy = (logits.argmax(-1) == labels) | (labels == IGNORE_INDEX)
    return [(float(s), bool(g)) for s, g in zip(logp.sum(-1).tolist(), greedy.all(-1).tolist(), strict=True)]


def score_items(
    model: nn.Module,
    tokenizer,
    items: Sequence[MCItem],
    batch_size: int = 16,
    progress: Progress | None = None,
) -> list[MCScore]:
    """Score every choice of every item by log-likelihood; batched over items.

    Args:
        model: A causal LM.
        tokenizer: Its ``evolm.Tokenizer``.
        items: The questions.
        batch_size: Distinct contexts per forward.
        progress: Called with the number of choices scored after each batch (the total is
            ``sum(len(item.choices) for item in items)``).

    Returns:
        One ``MCScore`` per item.
    """
    requests: list[tuple[list[int], list[int]]] = []
    for item in items:
        requests.extend(split_context(tokenizer, item.context, choice) for choice in item.choices)
    values = loglikelihoods(model, requests, batch_size, progress)
    scores, k = [], 0
    for item in items:
        lp = tuple(v[0] for v in values[k : k + len(item.choices)])
        k += len(item.choices)
        lengths = item.length or tuple(len(ch) for ch in item.choices)
        norm = [x / max(n, 1) for x, n in zip(lp, lengths, strict=True)]
        pred = max(range(len(lp)), key=lambda i: (lp[i], -i))
        pred_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
        scores.append(MCScore(lp, pred, pred_norm, item.scores[pred], item.scores[pred_norm]))
    return scores


def summarize(items: Sequence[MCItem], scores: Sequence[MCScore]) -> dict:
    """Per-group and overall accuracy.

    ``micro`` averages over questions; ``macro`` averages the per-group accuracies (each subject
    weighs the same however many questions it has).

    Returns:
        ``{"n", "acc", "acc_norm", "acc_macro", "acc_norm_macro", "groups": {name: {"n", "acc",
        "acc_norm"}}}``; ``acc``/``acc_norm`` are the micro averages.
    """
    groups: dict[str, list[MCScore]] = defaultdict(list)
    for item, score in zip(items, scores, strict=True):
        groups[item.group].append(score)
    per_group = {
        name: {
            "n": len(g),
            "acc": sum(s.acc for s in g) / len(g),
            "acc_norm": sum(s.acc_norm for s in g) / len(g),
        }
        for name, g in sorted(groups.items())
    }
    n = len(scores)
    nan = math.nan
    return {
        "n": n,
        "acc": sum(s.acc for s in scores) / n if n else nan,
        "acc_norm": sum(s.acc_norm for s in scores) / n if n else nan,
        "acc_macro": sum(g["acc"] for g in per_group.values()) / len(per_group) if per_group else nan,
        "acc_norm_macro": sum(g["acc_norm"] for g in per_group.values()) / len(per_group) if per_group else nan,
        "groups": per_group,
    }
