"""CPU memory for weights: blocks backed by transparent huge pages, weights of one layer side by side.

A decode step at batch 1 streams every weight from memory once, one matrix-vector product after
another, so its speed is the read bandwidth those streams reach. Two things raise it on CPUs:

* **Huge pages.** With 4 KB pages a stream crosses a page every 4 KB, where the hardware
  prefetchers stop and the TLB misses. Linux backs a 2 MB-aligned region with 2 MB pages when it is
  marked ``MADV_HUGEPAGE`` before its first touch (transparent huge pages, in ``madvise`` mode on
  most distributions, this machine's included); PyTorch's own allocator does so only when the
  process starts with ``THP_MEM_ALLOC_ENABLE=1``.
* **One block per layer.** The weights one layer reads in turn (q, k, v, o, gate, up, down) lie
  one after another in one allocation, so a thread's stream runs on from one product's share
  into the next one's region instead of starting anew elsewhere.

Measured on the decode benchmark's weights (Zen 4, 2 threads, the gemv sequence of one step, as a
share of ``sum()`` over one ordinary buffer of the same size): bf16 0.61 -> 0.73 when the host's
memory is in its fast state, 0.89 -> 0.93 in its slow one (benchmarks/README.md). A huge-page
buffer read by ``sum()`` itself is 1-18% faster than an ordinary one, so the decode benchmark's
bound takes the faster of the two.

Where ``madvise`` is missing (not Linux) or refused, blocks are ordinary memory: same numbers,
no error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

import torch

HUGE_PAGE = 2 << 20
_ALIGN = 64  # each tensor of a block starts on a cache line
_MADV_HUGEPAGE = 14  # <linux/mman.h>


@functools.cache
def _madvise():
    """libc's ``madvise``, or None where huge pages cannot be asked for."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def huge_page_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of ``nbytes`` bytes, 2 MB-aligned and marked for huge pages.

    The pages are allocated on first touch, so write it before anything else reads it.
    """
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # room to align the start
    start = -raw.data_ptr() % HUGE_PAGE
    block = raw[start : start + nbytes]
    madvise = _madvise()
    if madvise is not None and nbytes:
        madvise(block.data_ptr(), -(-nbytes // HUGE_PAGE) * HUGE_PAGE, _MADV_HUGEPAGE)  # a refusal leaves 4 KB pages
    return block


def pack(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Copies of ``tensors`` (floating point, any device) converted to ``dtype``, side by side in one
    huge-page CPU block in the order given; each is a contiguous view of the block."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += -(-t.numel() * dtype.itemsize // _ALIGN) * _ALIGN
    block = huge_page_empty(end)
    out = []
    for t, off in zip(tensors, offsets, strict=True):
        view = block[off : off + t.numel() * dtype.itemsize].view(dtype).view(t.shape)
        view.copy_(t)
        out.append(view)
    return out
