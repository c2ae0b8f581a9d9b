"""Read a llama.cpp GGUF checkpoint as HF-named float32 tensors and a transformers config dict.

Format: GGUF v3 (ggml-org/ggml `docs/gguf.md`), parsed with llama.cpp's own Python reader
(`gguf.GGUFReader`) and dequantised with its reference kernels (`gguf.quants.dequantize`), so
every type that package can unpack (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants, the IQ-quants)
is read the way llama.cpp writes it.

llama.cpp's converter (`convert_hf_to_gguf.py`) renames tensors, stores the output projection
only when it is not tied to the embedding, and interleaves the rows of q_proj/k_proj for its
pairwise RoPE. `read_gguf` undoes all three, so the tensors equal HF's state dict.

Architectures are rows of `_ARCHITECTURES`: how the metadata becomes a config, how tensor names
map, which rows to un-permute. Only "llama" (Llama 1/2/3, SmolLM, Mistral-as-llama) is there now.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from evolm.errors import CheckpointError, UnsupportedModelError

__all__ = ["GGUFCheckpoint", "gguf_field", "open_gguf", "read_gguf", "read_gguf_config"]

_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")
_MISSING = object()


@dataclass
class GGUFCheckpoint:
    """One GGUF file, dequantised into the weights and config HF transformers would load.

    Attributes:
        path: The file read.
        architecture: `general.architecture`, e.g. "llama".
        hf_config: A transformers `config.json` dict (model_type, sizes, rope, token ids).
        tensors: HF parameter name -> float32 tensor in HF's (out, in) layout.
    """

    path: Path
    architecture: str
    hf_config: dict
    tensors: dict[str, torch.Tensor] = field(repr=False)


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Open a GGUF file (see ``_open_gguf``); the parsed reader is reused while the file is unchanged,
    so reading the weights and then the vocabulary parses the header once."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    st = path.stat()
    return _open_gguf_cached(path.resolve(), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _open_gguf_cached(path: Path, mtime_ns: int, size: int) -> gguf.GGUFReader:
    return _open_gguf(path)


def _open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Open a GGUF file, turning every way the reader can fail into a `CheckpointError`.

    Args:
        path: The .gguf file.

    Returns:
        The reader; its tensors are views into a read-only memory map of the file.

    Raises:
        CheckpointError: missing, empty, not a GGUF, truncated or with an unreadable header.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (expected magic b'GGUF', found {magic!r})")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader signals truncation with ValueError, IndexError, ...
        raise CheckpointError(f"{path}: unreadable GGUF (truncated or corrupt): {type(exc).__name__}: {exc}") from exc
    declared = int(gguf_field(reader, "GGUF.tensor_count"))
    if declared != len(reader.tensors):
        raise CheckpointError(f"{path}: header declares {declared} tensors, found {len(reader.tensors)}")
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} ends at byte {end}, past the end of the file "
                f"({size} bytes); the file is truncated"
            )
    return reader


def gguf_field(reader: gguf.GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """The value of one metadata key: a Python scalar, a str, or a list for arrays.

    Args:
        reader: An open reader.
        key: The GGUF key, e.g. "llama.block_count".
        default: Returned when the key is absent; without it an absent key raises.

    Raises:
        CheckpointError: the key is absent and no default was given, or it is not valid UTF-8.
    """
    entry = reader.fields.get(key)
    if entry is None:
        if default is _MISSING:
            raise CheckpointError(f"{reader.data.filename}: metadata key {key!r} is missing")
        return default
    try:
        return entry.contents()
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{reader.data.filename}: metadata key {key!r} is not valid UTF-8: {exc}") from exc


def _dequantize(path: Path, tensor: gguf.ReaderTensor) -> np.ndarray:
    """One tensor as a float32 array in numpy order (ggml's dims reversed: (rows, cols))."""
    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    try:
        values = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError as exc:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} has type {qtype.name}, which cannot be dequantised "
            f"(supported: the float and quantised types of gguf.quants.dequantize)"
        ) from exc
    expected = tuple(reversed([int(d) for d in tensor.shape]))
    if values.shape != expected:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} dequantised to shape {values.shape}, expected {expected} from its header"
        )
    # F32 comes back as a view of the read-only memory map; copy so the tensor owns its data.
    if np.may_share_memory(values, tensor.data) or values.dtype != np.float32:
        values = np.array(values, dtype=np.float32)
    return values


# --- llama -------------------------------------------------------------------------------


def _unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleaving (`LlamaModel.permute` in convert_hf_to_gguf.py).

    HF rotates the two halves of each head (`rotate_half`: row j pairs with row j + D/2);
    ggml's RoPE rotates adjacent rows (2j, 2j + 1). The converter therefore stores HF row j at
    row 2j and HF row j + D/2 at row 2j + 1. Works on weights (rows, in) and biases (rows,).

    Args:
        weight: (n_head * D, ...) rows in llama.cpp's order.
        n_head: Heads in this projection (query heads for q, key/value heads for k).

    Returns:
        The same rows in HF's order.
    """
    head_dim = weight.shape[0] // n_head
    tail = weight.shape[1:]
    pairs = weight.reshape(n_head, head_dim // 2, 2, *tail)  # (H, D/2, 2, ...): GGUF order
    return pairs.swapaxes(1, 2).reshape(weight.shape)  # (H, 2, D/2, ...) -> (H*D, ...)


def _llama3_rope_scaling(path: Path, factors: np.ndarray, head_dim: int, theta: float) -> dict:
    """Recover HF's `rope_type: "llama3"` parameters from llama.cpp's `rope_freqs.weight`.

    Llama 3.1 (Meta, 2024) stretches low RoPE frequencies by `factor`, keeps high ones, and
    ramps between wavelengths L/high_freq_factor and L/low_freq_factor (L =
    original_max_position_embeddings). llama.cpp bakes this into one divisor per frequency;
    on the ramp, with s = (factor/divisor - 1)/(factor - 1), s = L/(hf - lf) / wavelength -
    lf/(hf - lf) is linear in 1/wavelength. We fit that line with lf fixed at 1 (only the ratios
    are determined) and check the fit reproduces every divisor.
    """
    freqs = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    inv_wavelen = freqs / (2 * math.pi)
    divisors = factors.astype(np.float64)
    factor = float(divisors.max())
    ramp = (divisors > 1 + 1e-5) & (divisors < factor * (1 - 1e-5))
    if divisors.shape != freqs.shape or ramp.sum() < 2:
        raise UnsupportedModelError(
            f"{path}: tensor 'rope_freqs.weight' (shape {factors.shape}, {int(ramp.sum())} ramp "
            f"values) is not a Llama 3 frequency scaling for head_dim {head_dim}; expected "
            f"{freqs.shape[0]} divisors with at least 2 on the ramp"
        )
    ramp_pos = (factor / divisors[ramp] - 1) / (factor - 1)
    slope, intercept = np.polyfit(inv_wavelen[ramp], ramp_pos, 1)
    high_freq_factor = 1 - 1 / intercept
    original_ctx = round(-slope / intercept)
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": round(float(high_freq_factor), 4),
        "original_max_position_embeddings": original_ctx,
    }
    wavelen = 1 / inv_wavelen
    ramp_s = (original_ctx * inv_wavelen - 1) / (scaling["high_freq_factor"] - 1)
    rebuilt = np.where(
        wavelen < original_ctx / scaling["high_freq_factor"],
        1.0,
        np.where(wavelen > original_ctx, factor, 1 / ((1 - ramp_s) / factor + ramp_s)),
    )
    if not np.allclose(rebuilt, divisors, rtol=1e-4):
        raise UnsupportedModelError(
            f"{path}: tensor 'rope_freqs.weight' does not follow Llama 3 frequency scaling; "
            f"best fit {scaling} is off by up to {np.abs(rebuilt / divisors - 1).max():.2e}"
        )
    return scaling


def _llama_rope_scaling(
    path: Path, meta: Callable[..., Any], raw: Mapping[str, np.ndarray], head_dim: int, theta: float
) -> dict | None:
    """HF `rope_scaling` from llama.cpp's `llama.rope.scaling.*` keys or `rope_freqs` tensor."""
    kind = meta("rope.scaling.type", None)
    factor = meta("rope.scaling.factor", None)
    if kind is None and meta("rope.scale_linear", None) is not None:  # pre-2024 files
        kind, factor = "linear", meta("rope.scale_linear")
    if "rope_freqs.weight" in raw:
        if kind not in (None, "none"):
            raise UnsupportedModelError(
                f"{path}: both 'rope_freqs.weight' and llama.rope.scaling.type={kind!r}; expected one of them"
            )
        return _llama3_rope_scaling(path, raw["rope_freqs.weight"], head_dim, theta)
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {
            "rope_type": "yarn",
            "factor": float(factor),
            "original_max_position_embeddings": int(meta("rope.scaling.original_context_length")),
        }
        for key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (value := meta(f"rope.scaling.{key}", None)) is not None:
                scaling[hf_key] = float(value)
        return scaling
    raise UnsupportedModelError(
        f"{path}: llama.rope.scaling.type is {kind!r}; supported: 'none', 'linear', 'yarn' "
        f"(and Llama 3 'rope_freqs.weight')"
    )


def _llama_config(path: Path, reader: gguf.GGUFReader, raw: Mapping[str, np.ndarray]) -> dict:
    """A `LlamaConfig` dict from `llama.*` and `tokenizer.ggml.*` metadata (llama.cpp's keys)."""

    def meta(key: str, default: Any = _MISSING) -> Any:
        return gguf_field(reader, f"llama.{key}", default)

    hidden = int(meta("embedding_length"))
    n_head = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", None) or meta("rope.dimension_count", None) or hidden // n_head)
    n_rot = int(meta("rope.dimension_count", head_dim))
    if n_rot != head_dim:
        raise UnsupportedModelError(
            f"{path}: llama.rope.dimension_count is {n_rot} but head_dim is {head_dim}; "
            f"llama rotates the whole head (partial rotary is not llama)"
        )
    if "token_embd.weight" not in raw:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")
    embed_rows = raw["token_embd.weight"].shape[0]
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    vocab_size = int(meta("vocab_size", None) or n_tokens or embed_rows)
    if vocab_size != embed_rows:
        raise CheckpointError(
            f"{path}: llama.vocab_size is {vocab_size} but tensor 'token_embd.weight' has {embed_rows} rows"
        )
    theta = float(meta("rope.freq_base", 10000.0))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "max_position_embeddings": int(meta("context_length")),
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in raw,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in raw,
    }
    if (scaling := _llama_rope_scaling(path, meta, raw, head_dim, theta)) is not None:
        config["rope_scaling"] = scaling
    for key, hf_key in (("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        if (token_id := gguf_field(reader, f"tokenizer.ggml.{key}_token_id", None)) is not None:
            config[f"{hf_key}_token_id"] = int(token_id)
    return config


def _llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every HF parameter of a `LlamaForCausalLM` with this config, and its shape."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q_rows = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_rows = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {
        "model.embed_tokens.weight": (cfg["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], hidden)
    layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
        "self_attn.o_proj.weight": (hidden, q_rows),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    if cfg["attention_bias"]:
        layer |= {
            "self_attn.q_proj.bias": (q_rows,),
            "self_attn.k_proj.bias": (kv_rows,),
            "self_attn.v_proj.bias": (kv_rows,),
            "self_attn.o_proj.bias": (hidden,),
        }
    for i in range(cfg["num_hidden_layers"]):
        shapes |= {f"model.layers.{i}.{leaf}": shape for leaf, shape in layer.items()}
    return shapes


def _llama_fix(hf_name: str, values: np.ndarray, cfg: dict) -> np.ndarray:
    """Put q/k rows back in HF's rotate-half order; every other tensor is already HF's."""
    if ".self_attn.q_proj." in hf_name:
        return _unpermute_rope_rows(values, cfg["num_attention_heads"])
    if ".self_attn.k_proj." in hf_name:
        return _unpermute_rope_rows(values, cfg["num_key_value_heads"])
    return values


@dataclass(frozen=True)
class _Architecture:
    """How one `general.architecture` maps onto a transformers model.

    Attributes:
        config: (path, reader, GGUF-named arrays) -> HF config dict.
        shapes: HF config -> every HF parameter name and its shape.
        names: GGUF name outside the blocks -> HF name.
        block_names: GGUF leaf inside `blk.N.` -> HF leaf inside `model.layers.N.`.
        derived: GGUF names that carry no weight of their own (folded into the config).
        fix: (HF name, array, config) -> array in HF's layout.
    """

    config: Callable[[Path, gguf.GGUFReader, Mapping[str, np.ndarray]], dict]
    shapes: Callable[[dict], dict[str, tuple[int, ...]]]
    names: Mapping[str, str]
    block_names: Mapping[str, str]
    derived: frozenset[str]
    fix: Callable[[str, np.ndarray, dict], np.ndarray]


_LLAMA = _Architecture(
    config=_llama_config,
    shapes=_llama_shapes,
    names={
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    },
    block_names={
        "attn_norm.weight": "input_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "attn_q.bias": "self_attn.q_proj.bias",
        "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias",
        "attn_output.bias": "self_attn.o_proj.bias",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    },
    # rope_freqs becomes rope_scaling; attn_rot_embd is an old file's copy of inv_freq.
    derived=frozenset({"rope_freqs.weight", "attn_rot_embd.weight"}),
    fix=_llama_fix,
)

_ARCHITECTURES: dict[str, _Architecture] = {"llama": _LLAMA}


def _hf_name(path: Path, arch: _Architecture, name: str, n_layers: int) -> str | None:
    """The HF name of a GGUF tensor, None for a derived one; raise for one we cannot place."""
    if name in arch.derived:
        return None
    if name in arch.names:
        return arch.names[name]
    match = _BLOCK_NAME.match(name)
    if match is not None:
        index, leaf = int(match.group(1)), match.group(2)
        if leaf in arch.derived:
            return None
        if leaf in arch.block_names and index < n_layers:
            return f"model.layers.{index}.{arch.block_names[leaf]}"
        if index >= n_layers:
            raise CheckpointError(f"{path}: tensor {name!r} is in block {index}, but the model has {n_layers} blocks")
    raise UnsupportedModelError(
        f"{path}: tensor {name!r} has no counterpart in the HF model (an architecture variant "
        f"such as MoE that evolm does not read yet)"
    )


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Read a GGUF checkpoint into HF-named float32 tensors and a transformers config dict.

    Args:
        path: The .gguf file (one file; split checkpoints are not supported).

    Returns:
        The checkpoint. Tensors are float32, (out, in) like `nn.Linear.weight`, with llama.cpp's
        q/k row permutation undone, so they equal what transformers loads from the same file.

    Raises:
        CheckpointError: unreadable or truncated file, missing keys or tensors, wrong shapes,
            or a tensor type that cannot be dequantised.
        UnsupportedModelError: an architecture or variant not in `_ARCHITECTURES`.
    """
    path = Path(path)
    reader = open_gguf(path)
    if int(gguf_field(reader, "split.count", 1)) > 1:
        raise UnsupportedModelError(
            f"{path}: split GGUF checkpoints are not supported; merge them first (llama-gguf-split --merge)"
        )
    architecture = gguf_field(reader, "general.architecture")
    spec = _ARCHITECTURES.get(architecture)
    if spec is None:
        raise UnsupportedModelError(
            f"{path}: general.architecture is {architecture!r}; supported: {sorted(_ARCHITECTURES)}"
        )
    raw = {tensor.name: _dequantize(path, tensor) for tensor in reader.tensors}
    config = spec.config(path, reader, raw)
    expected = spec.shapes(config)
    tensors: dict[str, torch.Tensor] = {}
    for name, values in raw.items():
        hf_name = _hf_name(path, spec, name, config["num_hidden_layers"])
        if hf_name is None:
            continue
        if hf_name not in expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({hf_name}) is not expected for "
                f"this config (attention_bias={config.get('attention_bias')})"
            )
        if values.shape != expected[hf_name]:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({hf_name}) has shape {values.shape}, expected "
                f"{expected[hf_name]} from the metadata"
            )
        tensors[hf_name] = torch.from_numpy(np.ascontiguousarray(spec.fix(hf_name, values, config)))
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensors the metadata implies are missing, e.g. {missing[:3]}")
    return GGUFCheckpoint(path=path, architecture=architecture, hf_config=config, tensors=tensors)


def read_gguf_config(path: str | Path) -> dict:
    """The transformers config dict of a GGUF file, reading metadata and tensor shapes only.

    Cheap where ``read_gguf`` dequantises every tensor: the config needs only shapes (vocab rows,
    whether an output head or biases exist), plus the small ``rope_freqs`` tensor when present.
    """
    path = Path(path)
    reader = open_gguf(path)
    architecture = gguf_field(reader, "general.architecture")
    spec = _ARCHITECTURES.get(architecture)
    if spec is None:
        raise UnsupportedModelError(
            f"{path}: general.architecture is {architecture!r}; supported: {sorted(_ARCHITECTURES)}"
        )
    raw: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            raw[tensor.name] = _dequantize(path, tensor)
        else:  # a zero-stride view: the right shape, no memory
            shape = tuple(int(n) for n in reversed(tensor.shape))
            raw[tensor.name] = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape, (0,) * len(shape))
    return spec.config(path, reader, raw)
