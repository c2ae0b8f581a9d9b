"""GGUF reading: weights, config and tokenizer against transformers and llama.cpp's own writer.

The real file is SmolLM2-135M-Instruct Q4_1 (the `smollm2_gguf` fixture). The synthetic files are
tiny llama checkpoints written with `gguf.GGUFWriter`, with q/k rows permuted the way llama.cpp's
`convert_hf_to_gguf.py` permutes them, so reading them back tests the un-permutation exactly.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import pre_tokenizers

from evolm.checkpoint.gguf import read_gguf
from evolm.errors import CheckpointError, UnsupportedModelError
from evolm.tokenizer.gguf_vocab import read_gguf_vocab

# --- the real SmolLM2 file against transformers -------------------------------------------------


@pytest.fixture(scope="module")
def hf_reference(smollm2_hf_reference):
    """transformers' config, tensors and parameter names for the file (see conftest)."""
    config, tensors, model = smollm2_hf_reference
    return config, tensors, set(model.state_dict())


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return read_gguf(smollm2_gguf)


def test_real_tensors_equal_transformers(smollm2, hf_reference):
    _, hf_tensors, hf_params = hf_reference
    assert set(smollm2.tensors) == set(hf_tensors)
    # tied: transformers' model also has lm_head.weight, which it ties to the embedding
    assert hf_params - set(smollm2.tensors) == {"lm_head.weight"}
    for name, ref in hf_tensors.items():
        got = smollm2.tensors[name]
        assert got.dtype == torch.float32 and got.shape == ref.shape, name
        torch.testing.assert_close(got, ref.float(), atol=1e-6, rtol=0, msg=name)
    # q/k really were permuted in the file: reading them raw would not give HF's rows
    q = smollm2.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q, q.view(9, 32, 2, 576).transpose(1, 2).reshape(576, 576))


def test_real_config_matches_transformers(smollm2, hf_reference):
    import transformers

    ref, _, _ = hf_reference
    cfg = smollm2.hf_config
    assert smollm2.architecture == "llama" and cfg["model_type"] == "llama"
    fields = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
    for key in fields:
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps)
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert "rope_scaling" not in cfg
    # the dict is a loadable transformers config
    rebuilt = transformers.LlamaConfig(**cfg)
    assert rebuilt.num_key_value_heads == 3 and rebuilt.rope_parameters["rope_theta"] == 100000.0


TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    if x > 1:\n\t\treturn x ** 2  # comment\n    return None\n\n\n",
    "Numbers: 1234567, 3.14159, -42, 1e10, 2024-01-01",
    "Unicode: café naïve Ünïcödé — “quotes” … ∑ ∫ 😀👍🏽🇫🇷 中文测试 日本語のテキスト 한국어",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|>x<repo_name>foo<file_sep>bar.py",
    "   leading and trailing spaces   ",
    "I'm can't won't they'll we've she'd HE'S",
    "\n\n\r\n\t \u00a0 \u3000",
    "ÿ\x00\x01 control chars \x7f",
    "",
]
# Where transformers' GGUF tokenizer leaves out SmolLM2's digit split, so whitespace before a
# number (or before a numeric symbol like ½) is grouped differently from the model's tokenizer.
DIGIT_EDGE_TEXTS = ["x 1234567 y  99", "… ½ and ² ①", "pi is  3.14"]


@pytest.fixture(scope="module")
def smollm2_vocab(smollm2_gguf):
    return read_gguf_vocab(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_hf_tokenizer):
    return smollm2_hf_tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_real_tokenizer_matches_transformers(smollm2_vocab, hf_tokenizer, text):
    ids = smollm2_vocab.tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert smollm2_vocab.tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.fixture(scope="module")
def smollm2_tokenizer_json(hf_tokenizer):
    """SmolLM2's own tokenizer.json: transformers' BPE, pre-tokenized by Digits then ByteLevel."""
    reference = tokenizers.Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return reference


@pytest.mark.parametrize("text", TEXTS + DIGIT_EDGE_TEXTS)
def test_real_tokenizer_matches_smollm2_tokenizer_json(smollm2_vocab, smollm2_tokenizer_json, text):
    ids = smollm2_vocab.tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == smollm2_tokenizer_json.encode(text, add_special_tokens=False).ids
    assert smollm2_vocab.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_real_tokenizer_metadata(smollm2_vocab):
    v = smollm2_vocab
    assert (v.bos_token_id, v.eos_token_id, v.pad_token_id, v.unk_token_id) == (1, 2, 2, 0)
    assert not v.add_bos_token and not v.add_eos_token
    assert v.chat_template.startswith("{% for message in messages %}")
    assert v.special_tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = v.tokenizer
    assert tok.get_vocab_size(with_added_tokens=True) == 49152
    assert tok.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == 1
    assert tok.encode("hi").ids == tok.encode("hi", add_special_tokens=False).ids  # no BOS
    ids = tok.encode("<|im_start|>hi<|im_end|>").ids
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


# --- synthetic llama files written with llama.cpp's writer -------------------------------------

TINY = dict(hidden=64, inter=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=96)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """`LlamaModel.permute` of convert_hf_to_gguf.py: HF rotate-half rows -> interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_llama(seed: int = 0, tied: bool = True, **dims) -> dict[str, np.ndarray]:
    """HF-named float32 weights of a tiny llama."""
    d = TINY | dims
    rng = np.random.default_rng(seed)
    q_rows, kv_rows = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    shapes = {"model.embed_tokens.weight": (d["vocab"], d["hidden"]), "model.norm.weight": (d["hidden"],)}
    if not tied:
        shapes["lm_head.weight"] = (d["vocab"], d["hidden"])
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d["hidden"],),
            p + "self_attn.q_proj.weight": (q_rows, d["hidden"]),
            p + "self_attn.k_proj.weight": (kv_rows, d["hidden"]),
            p + "self_attn.v_proj.weight": (kv_rows, d["hidden"]),
            p + "self_attn.o_proj.weight": (d["hidden"], q_rows),
            p + "post_attention_layernorm.weight": (d["hidden"],),
            p + "mlp.gate_proj.weight": (d["inter"], d["hidden"]),
            p + "mlp.up_proj.weight": (d["inter"], d["hidden"]),
            p + "mlp.down_proj.weight": (d["hidden"], d["inter"]),
        }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, index, leaf = hf_name.split(".", 3)
    return f"blk.{index}.{GGUF_NAMES[leaf]}"


def write_llama(
    path: Path,
    weights: dict[str, np.ndarray],
    qtype: Q = Q.F32,
    arch: str = "llama",
    extra: dict[str, np.ndarray] | None = None,
    meta=None,
    **dims,
) -> Path:
    """Write a llama GGUF as llama.cpp's converter would: renamed, q/k permuted, norms in F32."""
    d = TINY | dims
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(d["layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(d["hidden"])
    writer.add_feed_forward_length(d["inter"])
    writer.add_head_count(d["heads"])
    writer.add_head_count_kv(d["kv_heads"])
    writer.add_rope_dimension_count(d["head_dim"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(d["vocab"])
    if meta is not None:
        meta(writer)
    for name, w in weights.items():
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, d["heads"])
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, d["kv_heads"])
        if w.dtype == np.uint8:  # already quantised blocks, (rows, bytes)
            writer.add_tensor(gguf_name(name), w, raw_dtype=qtype)
        elif w.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(gguf_name(name), w)
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    for name, w in (extra or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# max |read - original| / max |original| each type may introduce
QUANT_TOLERANCE = {
    Q.F32: 0.0,
    Q.F16: 1e-3,
    Q.BF16: 1e-2,
    Q.Q8_0: 1e-2,
    Q.Q5_0: 0.1,
    Q.Q5_1: 0.1,
    Q.Q4_0: 0.2,
    Q.Q4_1: 0.2,
}


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE), ids=lambda q: q.name)
def test_synthetic_quant_types_round_trip(tmp_path, qtype):
    weights = random_llama()
    ckpt = read_gguf(write_llama(tmp_path / "m.gguf", weights, qtype))
    assert set(ckpt.tensors) == set(weights)
    for name, w in weights.items():
        got = ckpt.tensors[name].numpy()
        # row-wise quantisation commutes with the row permutation, so q/k come back as HF's rows
        expected = w if w.ndim == 1 else gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0, err_msg=name)
        assert np.abs(got - w).max() <= QUANT_TOLERANCE[qtype] * np.abs(w).max(), name


# byte offsets of the float16 scales in one block; gguf.quants cannot quantise to K-quants
K_QUANT_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_k_quant(rng: np.random.Generator, rows: int, cols: int, qtype: Q) -> np.ndarray:
    """Random K-quant blocks with small finite scales, as (rows, bytes) uint8."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in K_QUANT_SCALES[qtype]:
        scale = rng.uniform(1e-3, 2e-2, (rows, cols // block)).astype(np.float16)
        blocks[..., offset : offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(K_QUANT_SCALES), ids=lambda q: q.name)
def test_synthetic_k_quants(tmp_path, qtype):
    dims = dict(hidden=256, inter=256, head_dim=64)  # K-quant blocks hold 256 values
    rng = np.random.default_rng(2)
    weights = {
        name: w if w.ndim == 1 else random_k_quant(rng, *w.shape, qtype) for name, w in random_llama(**dims).items()
    }
    ckpt = read_gguf(write_llama(tmp_path / "k.gguf", weights, qtype, **dims))
    for name, w in weights.items():
        expected = w if w.ndim == 1 else gguf.quants.dequantize(w, qtype)
        np.testing.assert_array_equal(ckpt.tensors[name].numpy(), expected, err_msg=name)


def test_synthetic_f32_is_exact_and_loads_into_transformers(tmp_path):
    import transformers

    weights = random_llama(seed=1, tied=False)
    ckpt = read_gguf(write_llama(tmp_path / "m.gguf", weights))
    for name, w in weights.items():
        assert torch.equal(ckpt.tensors[name], torch.from_numpy(w)), name
    cfg = ckpt.hf_config
    assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in ckpt.tensors
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    model.load_state_dict(ckpt.tensors, strict=True)


def llama3_rope_divisors(head_dim, theta, factor, low, high, original_ctx) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama 3.1 scaling (LlamaModel.generate_extra_tensors)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original_ctx / high:
            out.append(1.0)
        elif wavelen > original_ctx / low:
            out.append(factor)
        else:
            smooth = (original_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_synthetic_llama3_rope_freqs_become_rope_scaling(tmp_path):
    dims = dict(hidden=128, heads=1, kv_heads=1, head_dim=128)
    divisors = llama3_rope_divisors(128, 10000.0, 8.0, 1.0, 4.0, 8192)
    path = write_llama(tmp_path / "m.gguf", random_llama(**dims), extra={"rope_freqs.weight": divisors}, **dims)
    scaling = read_gguf(path).hf_config["rope_scaling"]
    assert scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    bad = write_llama(tmp_path / "bad.gguf", random_llama(**dims), extra={"rope_freqs.weight": divisors**0.5}, **dims)
    with pytest.raises(UnsupportedModelError, match="rope_freqs.weight"):
        read_gguf(bad)


def test_synthetic_linear_and_yarn_rope_scaling(tmp_path):
    def linear(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(2.0)
        w.add_rope_scaling_orig_ctx_len(64)

    cfg = read_gguf(write_llama(tmp_path / "a.gguf", random_llama(), meta=linear)).hf_config
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    cfg = read_gguf(write_llama(tmp_path / "b.gguf", random_llama(), meta=yarn)).hf_config
    assert cfg["rope_scaling"] == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}


# --- bad input --------------------------------------------------------------------------------


@pytest.fixture
def small_gguf(tmp_path) -> Path:
    return write_llama(tmp_path / "small.gguf", random_llama(), Q.Q8_0)


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.01, 0.3, 0.9, 0.999])
def test_truncated_file_names_the_path(tmp_path, small_gguf, keep):
    data = small_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        read_gguf(cut)
    with pytest.raises(CheckpointError, match="cut.gguf"):
        read_gguf_vocab(cut)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not a GGUF"):
        read_gguf(path)
    with pytest.raises(CheckpointError, match="no such GGUF"):
        read_gguf(tmp_path / "missing.gguf")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # misread bytes
def test_tensor_count_mismatch(tmp_path, small_gguf):
    data = bytearray(small_gguf.read_bytes())
    (count,) = struct.unpack_from("<Q", data, 8)  # magic, version, then the tensor count
    struct.pack_into("<Q", data, 8, count - 1)
    path = tmp_path / "short.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="short.gguf"):
        read_gguf(path)


def test_unsupported_architecture_lists_llama(tmp_path):
    path = write_llama(tmp_path / "m.gguf", random_llama(), arch="gpt2")
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*\['llama'\]"):
        read_gguf(path)


def test_unsupported_tensor_type_names_tensor(tmp_path):
    weights = random_llama()
    del weights["model.layers.1.mlp.up_proj.weight"]
    up = np.zeros((TINY["inter"], TINY["hidden"]), dtype=np.int32)
    path = write_llama(tmp_path / "m.gguf", weights, extra={"blk.1.ffn_up.weight": up})
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_up\.weight.*I32"):
        read_gguf(path)


def test_missing_and_unknown_tensors(tmp_path):
    weights = random_llama()
    del weights["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.down_proj\.weight"):
        read_gguf(write_llama(tmp_path / "a.gguf", weights))
    experts = np.zeros((4, TINY["inter"], TINY["hidden"]), dtype=np.float32)
    path = write_llama(tmp_path / "b.gguf", random_llama(), extra={"blk.0.ffn_gate_exps.weight": experts})
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.ffn_gate_exps\.weight"):
        read_gguf(path)


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    weights = random_llama()
    weights["model.layers.0.mlp.gate_proj.weight"] = weights["model.layers.0.mlp.gate_proj.weight"][:96]
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_gate\.weight.*\(96, 64\).*\(128, 64\)"):
        read_gguf(write_llama(tmp_path / "m.gguf", weights))


# --- synthetic tokenizers ---------------------------------------------------------------------

SPM_PIECES = [
    "▁",
    "h",
    "e",
    "l",
    "o",
    "w",
    "r",
    "d",
    "▁h",
    "he",
    "ll",
    "llo",
    "▁he",
    "▁hello",
    "▁w",
    "or",
    "▁wor",
    "▁world",
    "▁l",
    "lo",
    "▁lo",
    "ld",
]


def write_spm_vocab(path: Path, add_space_prefix: bool | None = None) -> Path:
    """A SentencePiece vocabulary as llama.cpp stores Llama 2's: specials, 256 bytes, pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES + ["<tool>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES) + [4]
    # longer pieces merge later in training, so they score lower
    scores = [0.0] * 259 + [-(len(p) * 10.0 + i) for i, p in enumerate(SPM_PIECES)] + [0.0]

    def meta(w):
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        if add_space_prefix is not None:
            w.add_add_space_prefix(add_space_prefix)

    return write_llama(path, random_llama(vocab=len(tokens)), meta=meta, vocab=len(tokens))


def test_synthetic_sentencepiece_tokenizer(tmp_path):
    import transformers

    path = write_spm_vocab(tmp_path / "spm.gguf")
    v = read_gguf_vocab(path)
    tok = v.tokenizer
    assert v.add_bos_token and not v.add_eos_token and v.unk_token_id == 0
    ids = tok.encode("hello world").ids
    assert ids[0] == 1 and [tok.id_to_token(i) for i in ids[1:]] == ["▁hello", "▁world"]
    # byte fallback for characters outside the vocabulary
    assert [tok.id_to_token(i) for i in tok.encode("hé", add_special_tokens=False).ids] == ["▁h", "<0xC3>", "<0xA9>"]
    # "▁" before every segment, after special tokens too (llama.cpp and HF's Llama tokenizer.json)
    pieces = [tok.id_to_token(i) for i in tok.encode("<s>hello<tool>world", add_special_tokens=False).ids]
    assert pieces == ["<s>", "▁hello", "<tool>", "▁world"]
    for text in ["hello world", "hé  hello", " hello", "hello\nworld", "ßwor"]:
        out = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(out) == text
    # where no special token splits the text, transformers' GGUF tokenizer agrees
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["hello world", "hello  world", "hé hello", "world hello"]:
        assert tok.encode(text, add_special_tokens=False).ids == ref.encode(text, add_special_tokens=False)

    plain = read_gguf_vocab(write_spm_vocab(tmp_path / "plain.gguf", add_space_prefix=False)).tokenizer
    assert [plain.id_to_token(i) for i in plain.encode("hello", add_special_tokens=False).ids] == ["he", "llo"]


BYTE_LEVEL_PRE = ["smollm", "llama-bpe", "llama3", "gpt-2", "default", "qwen2", "dbrx"]


@pytest.mark.parametrize("pre", BYTE_LEVEL_PRE)
def test_synthetic_byte_level_pre_tokenizers(tmp_path, pre):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "1 2", "12 3"]
    tokens = ["<|end|>", *alphabet, "Ġt", "he", "Ġthe", "12", "123"]

    def meta(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3] + [1] * (len(tokens) - 1))
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)

    path = write_llama(tmp_path / "bpe.gguf", random_llama(vocab=len(tokens)), meta=meta, vocab=len(tokens))
    v = read_gguf_vocab(path)
    text = "the 12345 <|end|>héllo\n\n  x"
    ids = v.tokenizer.encode(text, add_special_tokens=False).ids
    assert v.tokenizer.decode(ids, skip_special_tokens=False) == text and 0 in ids
    assert v.add_bos_token == (pre in ("llama-bpe", "llama3"))
    digits = [v.tokenizer.id_to_token(i) for i in v.tokenizer.encode("12345", add_special_tokens=False).ids]
    assert digits == (list("12345") if pre in ("smollm", "qwen2") else ["123", "4", "5"])


def test_unknown_tokenizer_model_and_pre(tmp_path):
    def rwkv(w):
        w.add_tokenizer_model("rwkv")
        w.add_token_list(["[UNK]", "a"])

    with pytest.raises(UnsupportedModelError, match=r"'rwkv'.*\['gpt2', 'llama', 'gemma4', 'bert', 't5'\]"):
        read_gguf_vocab(write_llama(tmp_path / "a.gguf", random_llama(), meta=rwkv))

    def odd_pre(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("no-such-pre")
        w.add_token_list(["a", "b", "ab"])
        w.add_token_merges(["a b"])

    with pytest.raises(UnsupportedModelError, match="no-such-pre.*smollm"):
        read_gguf_vocab(write_llama(tmp_path / "b.gguf", random_llama(), meta=odd_pre))


def test_config_only_read_matches_full_read(smollm2, smollm2_gguf):
    from evolm.checkpoint.gguf import read_gguf_config

    assert read_gguf_config(smollm2_gguf) == smollm2.hf_config
