"""Autoregressive generation over an explicit KV cache (the structure of gpt-fast).

``prefill`` runs the prompt through the model once, filling the per-layer caches;
``decode_one_token`` extends them by one token; ``generate`` / ``generate_stream`` loop the two
with sampling, EOS ids, stop strings and left-padded batches.

Left padding: rows of a batch are right-aligned; ``attention_mask`` marks real tokens with 1.
Positions count real tokens only (``cumsum(mask) - 1``), as Hugging Face's ``generate`` does, so a
padded row computes exactly what it would alone.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from evolm.errors import ConfigError
from evolm.infer.native_step import native_step
from evolm.infer.sampling import SamplingConfig, nonfinite_logits_error, sample_next
from evolm.nn import decode_kernels


def prefill(
    model: nn.Module,
    input_ids: torch.Tensor,
    cache: list,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
) -> torch.Tensor:
    """Run the prompt; returns the last position's logits (B, V)."""
    return model(input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache)[:, -1]


def decode_one_token(
    model: nn.Module,
    token: torch.Tensor,
    cache: list,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
) -> torch.Tensor:
    """One step: ``token`` (B, 1) at ``position_ids`` (B, 1) -> next-token logits (B, V)."""
    return model(token, position_ids=position_ids, attention_mask=attention_mask, cache=cache)[:, -1]


def decode_greedy(
    model: nn.Module,
    token: torch.Tensor,
    cache: list,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode_one_token`` and the greedy choice: next tokens (B,) and whether each row's logits were
    all finite (B,), so that a compiled step reads the logits once for both (``sample_next`` upcasts
    them, checks them and takes the argmax in separate passes: ~0.15 ms a step here)."""
    logits = decode_one_token(model, token, cache, attention_mask, position_ids)
    return logits.argmax(dim=-1), torch.isfinite(logits).all(dim=-1)


@functools.cache
def _compile(step: Callable) -> Callable:
    """``step`` through ``torch.compile`` (fullgraph), once per step function."""
    decode_kernels.available()  # before tracing: the graph reads decode_kernels.loaded
    return torch.compile(step, fullgraph=True, options={"size_asserts": False, "alignment_asserts": False})


def compiled_decode_one_token() -> Callable:
    """``decode_one_token`` compiled by ``torch.compile`` (fullgraph), built on first use.

    With a ``StaticKVCache`` (``model.new_cache(..., static=True)``) every step has the same
    shapes; the growing cache length is an integer Dynamo turns symbolic after its first change,
    so a run compiles twice (tens of seconds on a CPU) and then reuses the graph for every length.
    Inside the graph, one-row products run the AVX-512 kernel of ``evolm.nn.decode_kernels`` (built
    here on first use) where the CPU has it, else multiply-and-sum loops that Inductor fuses
    (``evolm.nn.linear._gemv``); the per-step Python work is gone. Inductor's shape and alignment
    checks on every intermediate are left out: the graph's inputs are the model's own tensors, and
    each check is a Python call per step (measured here: 3-8% of a bf16 step).
    """
    return _compile(decode_one_token)


def compiled_decode_greedy() -> Callable:
    """``decode_greedy`` compiled as ``compiled_decode_one_token`` is (greedy decoding's step)."""
    return _compile(decode_greedy)


# Compiled steps after this many in one generate call skip Dynamo's full guard check (~0.5 ms per step
# for a 12-layer model: every parameter and cache tensor). The first steps run every guard, and
# compile the static- and dynamic-length graphs; later steps of the same call pass the same model,
# cache and shapes, so only the guards that tell those graphs apart are evaluated.
_FULL_GUARD_STEPS = 3


def eos_id_list(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]


def _validate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, attention_mask) -> None:
    if getattr(getattr(model, "cfg", None), "is_encoder_decoder", False):
        raise ConfigError(
            f"{type(model).__name__} is an encoder-decoder model: generate with "
            "evolm.infer.seq2seq_generate.generate_seq2seq(model, input_ids, ...), which encodes the source once"
        )
    if not callable(getattr(model, "new_cache", None)):  # generation extends a KV cache, left to right
        raise ConfigError(
            f"{type(model).__name__} cannot generate text: it is not a causal language model (e.g. an "
            "encoder-only model, whose bidirectional attention has no next-token distribution); load a "
            "decoder checkpoint"
        )
    cfg = model.cfg
    check_inputs(input_ids, max_new_tokens, cfg.vocab_size, attention_mask, "prompt")
    total = input_ids.shape[1] + max_new_tokens
    if input_ids.shape[1] > cfg.max_seq_len:
        raise ConfigError(f"prompt of {input_ids.shape[1]} tokens is longer than the context length {cfg.max_seq_len}")
    if total > cfg.max_seq_len:
        raise ConfigError(
            f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds the context "
            f"length {cfg.max_seq_len}; lower max_new_tokens to at most {cfg.max_seq_len - input_ids.shape[1]}"
        )


def check_inputs(
    input_ids: torch.Tensor, max_new_tokens: int, vocab_size: int, attention_mask: torch.Tensor | None, what: str
) -> None:
    """The checks every generator makes of its inputs; ``what`` names them in errors (prompt, source).

    Raises:
        ConfigError: naming the bad value and what is allowed.
    """
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.dtype not in (torch.long, torch.int)
    ):
        raise ConfigError("input_ids must be an integer tensor of shape (batch, tokens)")
    if input_ids.shape[1] == 0:
        raise ConfigError(f"empty {what}: input_ids has 0 tokens; give at least one token (e.g. BOS)")
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens}; must be a positive integer")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ConfigError(f"token id {bad} is out of the vocabulary; allowed ids are 0..{vocab_size - 1}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ConfigError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
        )


def generate_stream(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
    cache: list | None = None,
    compile: bool = False,
    native: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), one step at a time; arguments as ``generate``.

    Rows that have finished (EOS or a stop string) keep yielding their EOS id (or 0 without one).
    The iteration ends when every row has finished or ``max_new_tokens`` were produced.
    """
    yield from _steps(
        model,
        input_ids,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        min_p,
        repetition_penalty,
        attention_mask,
        eos_token_id,
        seed,
        stop_strings,
        tokenizer,
        cache,
        compile,
        native,
        burst=False,
    )


@torch.inference_mode()
def _steps(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    repetition_penalty: float,
    attention_mask: torch.Tensor | None,
    eos_token_id: int | Sequence[int] | None,
    seed: int | None,
    stop_strings: Sequence[str] | None,
    tokenizer,
    cache: list | None,
    compile: bool,
    native: bool,
    burst: bool,
) -> Iterator[torch.Tensor]:
    """``generate_stream``'s steps. ``burst``: the caller takes every token at the end (``generate``), so
    greedy native decoding without stop strings may run all its steps in one call."""
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty)
    _validate(model, input_ids, max_new_tokens, attention_mask)
    if stop_strings and tokenizer is None:
        raise ConfigError("stop_strings need the tokenizer (pass tokenizer=...) to read the generated text")
    eos = eos_id_list(eos_token_id)
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    b, t = input_ids.shape
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    padded = attention_mask is not None and not bool(attention_mask.all())
    mask = attention_mask.to(device).long() if padded else None
    past = cache[0].length if cache is not None else 0
    if past and padded:
        raise ConfigError("continuing from a filled cache works for unpadded prompts only")
    if past + t + max_new_tokens > model.cfg.max_seq_len:
        raise ConfigError(
            f"cached ({past}) + prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds the context length "
            f"{model.cfg.max_seq_len}"
        )
    room = min((c.max_len for c in cache if hasattr(c, "max_len")), default=None) if cache is not None else None
    if room is not None and past + t + max_new_tokens > room:
        raise ConfigError(
            f"the cache holds {room} tokens but needs cached ({past}) + prompt ({t}) + max_new_tokens "
            f"({max_new_tokens}); allocate it with model.new_cache(batch, max_len) large enough"
        )
    if mask is not None:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    else:
        positions = torch.arange(past, past + t, device=device)[None].expand(b, t)
    if cache is None:
        size = t + max_new_tokens
        if compile:  # few distinct cache shapes, so few recompiles: multiples of 256 slots
            size = min(-(-size // 256) * 256, model.cfg.max_seq_len)
        cache = model.new_cache(b, size, static=compile)
    if device.type == "cpu":
        decode_kernels.available()  # eager steps use the AVX-512 kernels too (built once, ~7 s, then cached)
    greedy = sampling.greedy and repetition_penalty == 1.0
    # Batch-1 CPU steps of the models it covers run as one native call (evolm.infer.native_step).
    one_call = native_step(model, cache) if native and device.type == "cpu" and b == 1 and mask is None else None
    # Greedy compiled steps choose inside the graph; otherwise tokens come from sample_next.
    greedy_step = compiled_decode_greedy() if compile and greedy and one_call is None else None
    decode = compiled_decode_one_token() if compile and one_call is None else decode_one_token
    fill = eos[0] if eos else 0
    eos_t = torch.tensor(eos, device=device) if eos else None
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    context = input_ids
    generated: list[list[int]] = [[] for _ in range(b)]

    def choose(logits: torch.Tensor) -> torch.Tensor:
        return sample_next(logits, sampling, context if repetition_penalty != 1.0 else None, generator)

    token = choose(prefill(model, input_ids, cache, mask, positions))
    next_pos = positions[:, -1:] + 1  # (B, 1)
    if burst and one_call is not None and greedy and not stop_strings:
        yield token
        if max_new_tokens == 1 or int(token[0]) in eos:
            return
        tokens, nonfinite = one_call.greedy(int(token[0]), int(next_pos[0, 0]), max_new_tokens - 1, eos)
        yield from tokens.view(-1, 1)
        if nonfinite:
            raise nonfinite_logits_error(torch.zeros(1, dtype=torch.bool))
        return
    for step in range(max_new_tokens):
        token = torch.where(finished, torch.full_like(token, fill), token)
        yield token
        if eos_t is not None:
            finished |= torch.isin(token, eos_t)
        if stop_strings:
            for i in range(b):
                if not finished[i]:
                    generated[i].append(int(token[i]))
                    tail = tokenizer.decode(generated[i][-32:])
                    if any(s in tail for s in stop_strings):
                        finished[i] = True
        if bool(finished.all()) or step == max_new_tokens - 1:
            return
        if repetition_penalty != 1.0:
            context = torch.cat([context, token[:, None]], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if one_call is not None:
            logits, best, finite = one_call(int(token[0]), int(next_pos[0, 0]))
            if greedy and not bool(finite.all()):
                raise nonfinite_logits_error(finite)
            token = best if greedy else choose(logits)
        else:
            skip_guards = compile and step >= _FULL_GUARD_STEPS
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True) if skip_guards else contextlib.nullcontext():
                if greedy_step is not None:
                    token, finite = greedy_step(model, token[:, None], cache, mask, next_pos)
                    if not bool(finite.all()):
                        raise nonfinite_logits_error(finite)
                else:
                    token = choose(decode(model, token[:, None], cache, mask, next_pos))
        next_pos = next_pos + 1


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
    cache: list | None = None,
    compile: bool = False,
    native: bool = True,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids``.

    Args:
        model: A causal LM (``evolm.load_model`` / ``build_model``).
        input_ids: (B, T) prompts, left-padded when their lengths differ.
        max_new_tokens: Most tokens to add (> 0).
        temperature: 0 is greedy; > 0 samples.
        top_k: Keep the k most likely tokens (None/0: off; < 0 is an error).
        top_p: Nucleus mass in (0, 1].
        min_p: Relative probability floor in [0, 1].
        repetition_penalty: CTRL penalty (> 0; 1 is off).
        attention_mask: (B, T), 1 for real tokens, 0 for left padding.
        eos_token_id: Id(s) that end a row.
        seed: Seed for sampling, for reproducible draws.
        stop_strings: Strings that end a row once they appear in its generated text.
        tokenizer: Needed for ``stop_strings``.
        cache: Per-layer caches to extend (``model.new_cache``); ``input_ids`` then continue the
            tokens already cached (multi-turn chat). Default: a fresh cache.
        compile: Run decode steps through ``torch.compile`` over a static cache (gpt-fast): the
            first call compiles for tens of seconds, then each step is faster (see
            benchmarks/README.md); worth it for long or repeated generations.
        native: Run each batch-1 decode step on a CPU as one native call where the model is covered
            (pre-norm Llama-style decoders: ``evolm.infer.native_step``); it is faster than eager and
            compiled steps and needs no compiling, so ``compile`` then applies only to what it does
            not cover. False runs the model's modules (eagerly, or compiled with ``compile``).

    Returns:
        (B, T + n) LongTensor, n <= max_new_tokens the steps run; finished rows are filled with EOS.
    """
    steps = list(
        _steps(
            model,
            input_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            attention_mask=attention_mask,
            eos_token_id=eos_token_id,
            seed=seed,
            stop_strings=stop_strings,
            tokenizer=tokenizer,
            cache=cache,
            compile=compile,
            native=native,
            burst=True,
        )
    )
    new = torch.stack(steps, dim=1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)
    return torch.cat([input_ids.to(new.device), new], dim=1)
