"""Fixtures of the evaluation tests: BIG-bench task files and a tiny model with its tokenizer.

``bigbench_files``: the few BIG-bench tasks the tests read, extracted from the ``bigbench==1.0.0``
sdist by ``evolm.eval.bigbench.fetch_bigbench_tasks`` (pip, cached in ``~/.cache/evolm``; never
committed). ``tiny``: a 2-layer Llama (V=300, context 128) saved with ``evolm.save_model`` next
to a byte-level BPE tokenizer trained on a few standard-library modules, so CLI runs need no
download.
"""

from __future__ import annotations

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
        pytest.fail(f"cannot fetch BIG-bench tasks from the bigbench==1.0.0 sdist (pip, PyPI): {e}")


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
