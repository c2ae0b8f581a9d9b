"""``nn.Linear`` whose CPU matmuls, inference and training, run oneDNN.

PyTorch's CPU ``F.linear`` goes through MKL for float32; on CPUs MKL does not tune for (AMD EPYC
here) its products run at a fraction of what the cores can do, and bfloat16 products read an
unpacked weight layout. oneDNN (which PyTorch ships as MKL-DNN) does both well. Measured on this
machine (see benchmarks/README.md):

* inference, decode shapes: float32 matrix-vector 3.5x and bfloat16 (with the weight reordered
  once into oneDNN's blocked layout) 3.4x faster than ``F.linear``;
* training, 1024-token batches: float32 forward, input-gradient and weight-gradient products each
  about 2x faster (a whole float32 training step 1.5x). Products under ~16M multiply-adds keep
  ``F.linear``, whose lower per-call cost wins there. bfloat16 ``F.linear`` already runs oneDNN, so
  training under bf16 autocast keeps ``F.linear`` too (the products measured the same).

oneDNN's matmul op has no autograd formula, so training goes through ``_OneDNNLinear``, an
``autograd.Function`` whose backward is oneDNN products too::

    forward   y  = x W^T + b          (N, O) = (N, I) . (I, O)
    backward  dx = dy W               (N, I) = (N, O) . (O, I)
              dW = dy^T x             (O, I) = (O, N) . (N, I)
              db = sum_n dy           (O,)

Under autocast the inputs are cast first, exactly as autocast casts those of ``F.linear``, so the
products run in the autocast dtype and the gradients of float32 master weights come back float32.

Inference over a single row (a decode step at batch 1) runs the AVX-512 matrix-vector kernel of
``evolm.nn.decode_kernels`` once ``available()`` has loaded it (``evolm.generate`` does), eagerly or
compiled; without it a compiled step uses ``_gemv``, an eager one oneDNN.

The module is a subclass of ``nn.Linear`` with the same parameters and names, so checkpoints,
PEFT adapters and quantisers that swap ``nn.Linear`` by type or name see no difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from evolm.nn import decode_kernels

_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_ENABLED = _AVAILABLE
_INFER_DTYPES = (torch.float32, torch.bfloat16)  # dtypes whose no-grad products run oneDNN
_TRAIN_DTYPES = (torch.float32,)  # dtypes whose products with gradients run oneDNN (measured faster)
# Below ~16M multiply-adds (rows x in x out) the Python autograd.Function and oneDNN's per-call setup
# cost more than MKL's slower kernels: measured crossover 8-16M (1.3x faster at 16x1024x1024).
_TRAIN_MIN_MACS = 1 << 24
_PLAIN = (torch.Tensor, nn.Parameter)


def use_onednn(enabled: bool) -> bool:
    """Turn the oneDNN paths on or off (for comparisons); returns the previous setting."""
    global _ENABLED
    previous = _ENABLED
    _ENABLED = enabled and _AVAILABLE
    return previous


@torch.library.custom_op("evolm::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's matmul as an opaque op for torch.compile: Inductor lowers ``mkldnn._linear_pointwise``
    only for weights frozen into the graph as constants, and these are parameters or activations."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@_onednn_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN ``x w^T + b``: x (..., I) (copied if not contiguous), w (O, I) with any strides -> (..., O).

    Eager calls the ATen op directly (a custom op's Python dispatch costs as much as a decode-step
    matrix-vector product); compiled graphs see the custom op.
    """
    if torch.compiler.is_compiling():
        return _onednn_linear(x, w, b)
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x w^T + b`` for one row x (..., I) as a multiply-and-sum, for compiled decode steps.

    Inductor turns it into one vectorised loop that streams the weight once and fuses with its
    neighbours, where oneDNN's product is an opaque call on an unpacked weight (bf16: half the
    speed of the packed layout). bf16 rows are summed in two halves, two independent accumulator
    chains per row. Measured here over the decode benchmark's weights (share of a ``sum()`` read
    of the same bytes, repeated runs): bf16 one chain 0.59-0.78, two 0.76-0.78; float32 one chain
    0.87-0.88, more chains no better.
    """
    o, i = w.shape
    g = 2 if w.dtype != torch.float32 and i % 2 == 0 else 1
    y = (w.view(o, g, i // g).float() * x.reshape(1, g, i // g).float()).sum(-1).sum(-1)  # (O,)
    if b is not None:
        y = y + b.float()
    return y.to(x.dtype).view(*x.shape[:-1], o)


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` with oneDNN products in forward and backward (no double backward)."""

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """x (..., I), w (O, I), b (O,) or None, one dtype -> (..., O)."""
        return _mm(x, w, b)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        x, w, b = inputs
        ctx.save_for_backward(x if w.requires_grad else None, w)  # a frozen weight (LoRA's base) needs no x
        ctx.has_bias = b is not None

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, O)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm(g, w.t()).view(*grad.shape[:-1], w.shape[1])  # (N, O) . (O, I) -> (..., I); W^T in place
        if ctx.needs_input_grad[1]:
            gw = _mm(g.t(), x.reshape(-1, x.shape[-1]).t())  # (O, N) . (N, I) -> (O, I)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)  # (O,)
        return gx, gw, gb


def linear_group(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]``: the projections of one input (q/k/v, gate/up).

    Where every layer is a plain ``Linear`` without hooks whose product with ``x`` runs the AVX-512
    kernel (``Linear._runs_kernel``: a one-row inference product, i.e. a decode step at batch 1), they
    run as one kernel call: one parallel region instead of one per layer, the weights streamed one
    after another (measured over the decode benchmark's weights: 85 -> 49 calls a step, bf16 +4-5%
    of ``sum()`` bandwidth). Anything else (adapters, quantised or hooked layers, training,
    autocast, several rows) calls each layer.
    """
    if all(type(m) is Linear and not (m._forward_hooks or m._forward_pre_hooks) and m._runs_kernel(x) for m in layers):
        return decode_kernels.gemv_group(
            x, [m.weight.detach() for m in layers], [None if m.bias is None else m.bias.detach() for m in layers]
        )
    return [m(x) for m in layers]


class Linear(nn.Linear):
    """``y = x W^T + b`` (an ``nn.Linear``), computed by oneDNN on CPU where that is faster."""

    _packed: tuple[tuple, torch.Tensor] | None = None

    def _packed_weight(self) -> torch.Tensor:
        """The bf16 weight in oneDNN's blocked layout, rebuilt whenever the weight changes."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1))
        return self._packed[1]

    def _runs_kernel(self, x: torch.Tensor) -> bool:
        """``self(x)`` is a one-row inference product (a decode step at batch 1) that the AVX-512
        kernel of ``evolm.nn.decode_kernels`` runs: loaded, CPU, float32/bf16 of one dtype, no
        autocast, no gradient. Cheapest tests first: outside generation the first one fails."""
        w, b = self.weight, self.bias
        return (
            decode_kernels.loaded
            and x.shape[:-1].numel() == 1
            and _ENABLED
            and x.device.type == "cpu"
            and x.numel() > 0
            and type(x) in _PLAIN
            and type(w) in _PLAIN
            and (b is None or (type(b) in _PLAIN and b.dtype == x.dtype))
            and x.dtype in _INFER_DTYPES
            and w.dtype == x.dtype
            and not torch.is_autocast_enabled("cpu")
            and not (
                torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        w, b = self.weight, self.bias
        if self._runs_kernel(x):
            return decode_kernels.gemv(x, w.detach(), b.detach() if b is not None else None)
        if (
            not _ENABLED
            or x.device.type != "cpu"
            or x.numel() == 0  # oneDNN has no primitive for empty products
            or type(x) not in _PLAIN
            or type(w) not in _PLAIN
            or (b is not None and type(b) not in _PLAIN)
        ):
            return F.linear(x, w, b)
        autocast = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype  # the dtype the product runs in
        if not autocast and (w.dtype != dtype or (b is not None and b.dtype != dtype)):
            return F.linear(x, w, b)  # raises PyTorch's own dtype-mismatch error
        training = torch.is_grad_enabled() and (
            x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)
        )
        if dtype not in (_TRAIN_DTYPES if training else _INFER_DTYPES) or (
            training and x.numel() * w.shape[0] < _TRAIN_MIN_MACS
        ):
            return F.linear(x, w, b)
        if autocast:  # cast as autocast casts F.linear's inputs; autograd routes gradients back
            x, w = x.to(dtype), w.to(dtype)
            b = b.to(dtype) if b is not None else None
        if training:
            return _OneDNNLinear.apply(x, w, b)
        if not autocast and x.shape[:-1].numel() == 1 and torch.compiler.is_compiling():  # a compiled decode
            return _gemv(x, w.detach(), b.detach() if b is not None else None)  # step without the kernel
        if dtype == torch.bfloat16 and w is self.weight and not torch.compiler.is_compiling() and not w.is_inference():
            # a bf16 model: reorder once; an autocast copy is used as it is, and so is a weight made under
            # inference_mode, which has no version counter to tell when a cached reordering went stale
            w = self._packed_weight()
        return _mm(x, w.detach(), b.detach() if b is not None else None)
