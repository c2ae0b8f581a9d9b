"""llama.cpp's vocab-only GGUF files and the reference ids it tests them against.

llama.cpp keeps one vocabulary per tokenizer family in `models/ggml-vocab-<name>.gguf`, with
`<file>.inp` (test strings, each followed by a line `__ggml_vocab_test__`) and `<file>.out` (one
line of space-separated ids per string, made with the model's Hugging Face tokenizer by
`convert_hf_to_gguf_update.py`). Its `tests/test-tokenizer-0.cpp` encodes every string with
`common_tokenize(ctx, text, add_special=false, parse_special=false)` and compares.

The files come from the `llama-cpp-python` sdist, which vendors llama.cpp, fetched once with pip
into `~/.cache/evolm` (`evolm.assets.sdist_member`); they are third-party files and never
committed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from evolm.assets import sdist_member
from evolm.errors import CheckpointError

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
_MODELS_DIR = "vendor/llama.cpp/models"
_SEPARATOR = "\n__ggml_vocab_test__\n"


@dataclass(frozen=True)
class VocabReference:
    """One llama.cpp vocabulary and its test strings with the ids expected for each."""

    name: str
    gguf: Path
    inputs: list[str]
    expected: list[list[int]]


@cache
def llama_cpp_file(name: str) -> Path:
    """`models/<name>` from the llama.cpp inside the pinned `llama-cpp-python` sdist."""
    try:
        return sdist_member(LLAMA_CPP_SDIST, f"{_MODELS_DIR}/{name}")
    except CheckpointError as exc:
        pytest.fail(f"cannot fetch llama.cpp's {name} from the {LLAMA_CPP_SDIST} sdist (pip, PyPI): {exc}")


def parse_reference(inp: bytes, out: bytes) -> tuple[list[str], list[list[int]]]:
    """The (inputs, expected ids) pairs of a `.inp` / `.out` pair, read as test-tokenizer-0.cpp does.

    Inputs are the raw bytes between separators (no newline translation: a "\\r" stays);
    a file ending in the separator has no empty last input. Each output line is stripped and
    split at spaces; a blank line is an empty id list.
    """
    raw = inp.decode("utf-8")
    inputs = raw.split(_SEPARATOR)
    if raw.endswith(_SEPARATOR):
        inputs.pop()
    expected = [[int(t) for t in line.split()] for line in out.decode("utf-8").split("\n")]
    if expected and not expected[-1] and len(expected) == len(inputs) + 1:
        expected.pop()  # the newline ending the last line
    if len(inputs) != len(expected):
        raise ValueError(f"{len(inputs)} inputs but {len(expected)} output lines")
    return inputs, expected


@cache
def _reference(name: str) -> VocabReference:
    gguf = llama_cpp_file(f"ggml-vocab-{name}.gguf")
    inputs, expected = parse_reference(
        llama_cpp_file(f"ggml-vocab-{name}.gguf.inp").read_bytes(),
        llama_cpp_file(f"ggml-vocab-{name}.gguf.out").read_bytes(),
    )
    return VocabReference(name, gguf, inputs, expected)


@pytest.fixture(scope="session")
def llama_cpp_reference() -> Callable[[str], VocabReference]:
    """`name -> VocabReference` for a vocabulary that ships `.inp` / `.out` files."""
    return _reference


@pytest.fixture(scope="session")
def llama_cpp_vocab() -> Callable[[str], Path]:
    """`name -> path of models/ggml-vocab-<name>.gguf`."""
    return lambda name: llama_cpp_file(f"ggml-vocab-{name}.gguf")
