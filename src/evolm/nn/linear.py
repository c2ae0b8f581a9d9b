"""``nn.Linear`` whose inference forward on CPU runs oneDNN's matmul.

PyTorch's CPU ``F.linear`` goes through MKL for float32; on CPUs MKL does not tune for (AMD EPYC
here) its matrix-vector products run at a fraction of memory bandwidth, and bfloat16 products read
an unpacked weight layout. oneDNN (which PyTorch ships as MKL-DNN) does both well: measured on
this machine's decode shapes, float32 matrix-vector 3.5x and bfloat16 (with the weight reordered
once into oneDNN's blocked layout) 3.4x faster than ``F.linear``. See benchmarks/README.md.

The module is a subclass of ``nn.Linear`` with the same parameters and names, so checkpoints,
PEFT adapters and quantisers that swap ``nn.Linear`` by type or name see no difference. The oneDNN
path runs only where no gradient is needed (the op has no autograd formula); training uses
``F.linear``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_ENABLED = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def use_onednn(enabled: bool) -> bool:
    """Turn the oneDNN inference path on or off (for comparisons); returns the previous setting."""
    global _ENABLED
    previous = _ENABLED
    _ENABLED = enabled and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return previous


class Linear(nn.Linear):
    """``y = x W^T + b`` (an ``nn.Linear``), computed by oneDNN at CPU inference time."""

    _packed: tuple[tuple, torch.Tensor] | None = None

    def _packed_weight(self) -> torch.Tensor:
        """The bf16 weight in oneDNN's blocked layout, rebuilt whenever the weight changes."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        w = self.weight
        if (
            _ENABLED
            and x.device.type == "cpu"
            and x.dtype == w.dtype
            and x.dtype in (torch.float32, torch.bfloat16)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and not isinstance(w, nn.parameter.UninitializedParameter)
            and type(w) in (torch.Tensor, nn.Parameter)
        ):
            weight = self._packed_weight() if x.dtype == torch.bfloat16 else w.detach()
            bias = self.bias.detach() if self.bias is not None else None
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
        return F.linear(x, w, self.bias)
