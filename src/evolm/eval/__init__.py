"""Evaluation: perplexity, multiple choice by log-likelihood (MMLU, BIG-bench), HumanEval, lm_eval.

Every score goes through ``evolm.nn.losses.token_logprobs``::

    from evolm.eval import run_task, EvalConfig
    result = run_task("mmlu", model, tokenizer, EvalConfig(limit=20))
    result["metrics"]["acc"]

Modules: ``perplexity`` (strided sliding window, bits per byte), ``multiple_choice`` (batched
log-likelihood engine), ``mmlu``, ``bigbench``, ``humaneval`` (with ``passk`` and ``sandbox``),
``harness`` (an lm-evaluation-harness ``LM``; needs the optional ``lm_eval``), ``tasks`` (names ->
runs).
"""

from __future__ import annotations

from evolm.eval.multiple_choice import MCItem, MCScore, loglikelihoods, score_items, split_context, summarize
from evolm.eval.perplexity import PerplexityResult, perplexity, sequence_nll, strided_windows
from evolm.eval.tasks import TASKS, EvalConfig, parse_task, run_task

__all__ = [
    "TASKS",
    "EvalConfig",
    "MCItem",
    "MCScore",
    "PerplexityResult",
    "loglikelihoods",
    "parse_task",
    "perplexity",
    "run_task",
    "score_items",
    "sequence_nll",
    "split_context",
    "strided_windows",
    "summarize",
]
