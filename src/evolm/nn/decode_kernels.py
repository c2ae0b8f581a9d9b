"""Hand-written AVX-512 kernels for decode steps (``kernels/decode.cpp``): a matrix-vector product
and one-query attention over a KV cache.

``evolm.generate`` loads them (``available()``) before its first CPU step; from then on every
inference ``Linear`` over one row and every one-query ``attend`` without a score bias runs them,
eagerly or inside a compiled step (measured here, eager decode of the benchmark's model: fp32
31.9 -> 41.5 tok/s, bf16 49.7 -> 60.4), and the projections of one input (q/k/v, gate/up) run as
one ``gemv_group`` call (through ``evolm.nn.linear.linear_group``).

A decode step at batch 1 is bound by how fast its products stream their weights from memory (the
roofline of Williams et al., 2009). Inductor's multiply-and-sum loop (``evolm.nn.linear._gemv``)
reads bf16 weights at 0.6-0.8 of a ``sum()`` over the same bytes; this kernel reads each weight row
front to back with four accumulators (bf16 through AVX512_BF16's dot-product instruction), one
sequential stream per thread like ``sum()`` itself: 0.87-0.92 (bf16) and 0.96-0.99 (float32) of it,
measured over the decode benchmark's weights.

Attention for one query per row (``decode_attention``) works per key/value head: the query heads
that share it (grouped-query attention; Ainslie et al., 2023) read its cached rows in place, from
memory once and from L1/L2 for the other heads of the group, with scores and sums in float32.
Without it a compiled bf16 step calls SDPA on float32 copies of every layer's cache, and Inductor,
given the product written out, recomputes the query's rotary embedding for every cached key.

``kernels/decode_step.cpp`` adds ``torch.classes.evolm_kernels.DecodePlan``: a whole decode step of a
pre-norm Llama-style decoder at batch 1 in one call (driven by ``evolm.infer.native_step``).

The C++ sources are built on first use with ``torch.utils.cpp_extension`` (the compiler Inductor
already needs; ~10 s once here, then cached under ``$TORCH_EXTENSIONS_DIR``, under a name that hashes
the sources and ``kernels/simd.h``) and register the operators ``torch.ops.evolm_kernels.gemv``,
``.gemv_group`` and ``.decode_attention`` for CPU and Meta tensors, so a compiled graph calls each as
one opaque op. Only CPUs with AVX-512F, AVX-512BW and AVX512_BF16
(Intel Cooper Lake and later, AMD Zen 4 and later) run them; elsewhere, or when no compiler is
found, ``available()`` is False and callers keep Inductor's ``_gemv`` loop and SDPA.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path

import torch

_KERNELS = Path(__file__).with_name("kernels")
_SOURCES = (_KERNELS / "decode.cpp", _KERNELS / "decode_step.cpp")
_HEADERS = (_KERNELS / "simd.h",)
_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")
_log = logging.getLogger(__name__)
loaded = False  # set by available(); read inside compiled graphs, where building is not possible


def _cpu_flags() -> set[str]:
    """The instruction-set flags the kernel needs, read from /proc/cpuinfo (Linux x86-64 only)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def supported() -> bool:
    """True when this CPU has every instruction the kernel uses."""
    return all(flag in _cpu_flags() for flag in _REQUIRED_FLAGS)


def _digest() -> str:
    """A short hash of the kernel sources and headers."""
    h = hashlib.sha256()
    for p in (*_SOURCES, *_HEADERS):
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


@functools.cache
def available() -> bool:
    """Build (once per machine) and load the kernels; False, with the reason logged, where it cannot run."""
    if not supported():
        _log.info("evolm decode kernels not used: this CPU lacks one of %s", ", ".join(_REQUIRED_FLAGS))
        return False
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(
            name=f"evolm_decode_kernels_{_digest()}",  # a changed header rebuilds too (load hashes sources only)
            sources=[str(p) for p in _SOURCES],
            extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError, ValueError, cpp_extension.subprocess.CalledProcessError) as err:
        _log.warning("evolm decode kernels could not be built (%s); compiled decoding uses Inductor's loops", err)
        return False
    global loaded
    loaded = hasattr(torch.ops.evolm_kernels, "decode_attention") and hasattr(torch.classes.evolm_kernels, "DecodePlan")
    return loaded


def gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x w^T + b``: x (..., I), w (O, I), b (O,) or None, float32 or bfloat16 CPU tensors -> (..., O).

    Products are summed in float32 (bf16 pairs through the dot-product instruction) and rounded to
    the input dtype once, with the bias added in float32 before rounding. Call ``available()`` first.
    """
    return torch.ops.evolm_kernels.gemv(x, w, b)


def gemv_group(x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """``[x w^T + b for w, b in zip(ws, bs)]`` in one call: weights of one in-features, as ``gemv``.

    The rows of all weights are split across threads as one range, so the products of one input
    (q/k/v, gate/up) cost one parallel region and stream on from one weight into the next.
    """
    return torch.ops.evolm_kernels.gemv_group(x, ws, bs)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``softmax(scale q k^T) v`` for one query: q (B, H, 1, D), k (B, K, S, D), v (B, K, S, Dv), K
    dividing H, all float32 or all bfloat16 on CPU; ``allowed`` a bool (B or 1, 1, 1, S) mask of
    visible keys (each row must see at least one), or None. Returns (B, H, 1, Dv) in q's dtype.
    """
    return torch.ops.evolm_kernels.decode_attention(q, k, v, allowed, scale)
