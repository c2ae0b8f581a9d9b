"""evolm: the evolution of large language models as runnable, tested software.

Public API::

    model = evolm.load_model("path/to/hf_dir_or_file.gguf")
    logits = model(input_ids)                 # (B, T) -> (B, T, V)
    evolm.save_model(model, "out_dir")        # transformers loads it unchanged
    tok = evolm.load_tokenizer("path/to/hf_dir_or_file.gguf")
"""

from __future__ import annotations

from evolm.errors import CheckpointError, ConfigError, EvolmError, UnsupportedModelError
from evolm.models.build import build_model
from evolm.models.loading import load_config, load_model, save_model
from evolm.models.presets import preset, preset_names
from evolm.tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "EvolmError",
    "Tokenizer",
    "UnsupportedModelError",
    "build_model",
    "load_config",
    "load_model",
    "load_tokenizer",
    "preset",
    "preset_names",
    "save_model",
]
