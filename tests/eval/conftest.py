"""Fixtures of the evaluation tests: BIG-bench task files and a tiny model with its tokenizer.

``bigbench_files``: the few real BIG-bench tasks the tests read, extracted from the ``bigbench==1.0.0``
sdist by ``evolm.eval.bigbench.fetch_bigbench_tasks`` (pip, cached in ``~/.cache/evolm``; never
committed). PyPI no longer serves that sdist (only 0.0.1, without tasks), so tests that need the
real files skip where it cannot be fetched; ``authored_bigbench`` holds task files written here in
the same JSON format, so the prompt format, the CLI and the multi-token scorer are tested anyway.
``tiny``: a 2-layer Llama (V=300, context 128) saved with ``evolm.save_model`` next to a byte-level
BPE tokenizer trained on a few standard-library modules, so CLI runs need no download.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

BIGBENCH_TASKS = ("simple_arithmetic_json_multiple_choice", "conceptual_combinations/homonyms")


@pytest.fixture(scope="session")
def bigbench_files() -> dict[str, Path]:
    from evolm.errors import CheckpointError
    from evolm.eval.bigbench import fetch_bigbench_tasks

    try:
        return dict(zip(BIGBENCH_TASKS, fetch_bigbench_tasks(BIGBENCH_TASKS), strict=True))
    except CheckpointError as e:
        pytest.skip(f"the real BIG-bench tasks are not available: {e}")


@pytest.fixture(scope="session")
def authored_bigbench(tmp_path_factory) -> dict[str, Path]:
    """Task files in BIG-bench's JSON format written for these tests.

    ``arithmetic``: single-token answers, BIG-bench's own prompt fields overridden (``choice_prefix``).
    ``words``: answers of several tokens each, for the shared-context path of the scorer.
    """
    out = tmp_path_factory.mktemp("bigbench")
    sums = [(1, 4), (2, 2), (3, 5), (6, 1), (2, 7), (4, 4), (5, 3), (1, 8)]
    arithmetic = {
        "name": "authored_arithmetic",
        "description": "Sums of two digits.",
        "keywords": ["arithmetic"],
        "choice_prefix": " option: ",
        "examples": [
            {"input": f"{a} + {b} =", "target_scores": {str(a + b + d): float(d == 0) for d in (0, -1, 1, -2)}}
            for a, b in sums
        ],
    }
    words = {
        "name": "authored_words",
        "description": "Pick the phrase that means the same as the question's.",
        "keywords": ["paraphrase"],
        "examples": [
            {
                "input": "A place where books are kept and lent out is called",
                "target_scores": {"a public library": 1, "a railway station": 0, "an empty swimming pool": 0},
            },
            {
                "input": "The season that follows summer is",
                "target_scores": {"autumn, when leaves fall": 1, "spring, when flowers bloom": 0, "midnight": 0},
            },
        ],
    }
    files = {}
    for key, task in (("arithmetic", arithmetic), ("words", words)):
        files[key] = out / key / "task.json"
        files[key].parent.mkdir()
        files[key].write_text(json.dumps(task, indent=2) + "\n")
    return files


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``(model_dir, model, tokenizer)``: a saved 2-layer Llama and its trained BPE tokenizer."""
    import evolm
    from evolm.models.family import family_for
    from evolm.tokenizer.train import save_tokenizer, train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / f"{m}.py").read_text() for m in ("abc", "bisect", "colorsys", "fnmatch")]
    tokenizer = train_tokenizer(texts, "bpe", vocab_size=300)
    cfg = family_for("llama").config_from_hf(
        {
            "model_type": "llama",
            "vocab_size": 300,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "tie_word_embeddings": True,
        }
    )
    model = evolm.build_model(cfg, seed=0).eval()
    out = tmp_path_factory.mktemp("tiny")
    evolm.save_model(model, out)
    save_tokenizer(tokenizer, out)
    return out, evolm.load_model(out), evolm.load_tokenizer(out)
