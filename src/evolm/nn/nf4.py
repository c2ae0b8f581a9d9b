"""4-bit NormalFloat weights with double quantisation (Dettmers et al., 2023, QLoRA), in PyTorch.

A weight is cut into blocks of 64 values; each block is divided by its absolute maximum and every
value replaced by the nearest of 16 NF4 levels: the quantiles of a standard normal, rescaled to
[-1, 1], with an exact zero (QLoRA §3, appendix E). Two 4-bit indices share a byte.

Double quantisation (QLoRA §3) stores the per-block absmax scales themselves in 8 bits: the
scales' mean is subtracted, and blocks of 256 centred scales are stored as int8 with one float32
absmax each. (The paper uses an 8-bit float code for this second level; a symmetric int8 code
costs the same bits.) Storage per weight::

    4 bits (index) + 8/64 (int8 scale) + 32/(64·256) (its float32 scale) ≈ 4.127 bits ≈ 0.516 bytes

Error bound: a value x in a block with absmax a is rounded to the nearest level, so
``|x - q(x)| <= a · g / 2`` with g the widest gap between neighbouring levels of its interval
(g/2 <= 0.152, between -1 and -0.696); the 8-bit scale adds at most ``|level| · e_a`` where e_a is
the scale's own rounding error (<= its block absmax / 254).

``Linear4bit`` keeps only the packed form and dequantises inside forward and again inside backward
(an ``autograd.Function``), so no full-precision copy of the weight outlives a matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

# The NF4 levels of QLoRA's appendix E (the values bitsandbytes ships), ascending.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
BLOCK_SIZE = 64
DQ_BLOCK_SIZE = 256
_NF4 = torch.tensor(NF4_LEVELS, dtype=torch.float32)
_MIDPOINTS = (_NF4[1:] + _NF4[:-1]) / 2  # (15,) decision boundaries between neighbouring levels


def nf4_levels_from_quantiles(offset: float = 0.9677083) -> torch.Tensor:
    """The NF4 levels built as QLoRA defines them: 8 positive and 7 negative quantiles of N(0, 1)
    (equally spaced probabilities from ``offset`` to 1/2), a zero, all divided by the largest.

    Returns:
        (16,) float64, ascending.
    """
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # (8,)
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # (7,)
    levels = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return levels / levels.max()


@dataclass
class NF4Tensor:
    """A weight in NF4 with double-quantised block scales.

    Attributes:
        packed: (ceil(n / 2),) uint8, two 4-bit level indices per byte (high nibble first).
        scales_q: (n_blocks,) int8, the centred block absmax values, quantised.
        scales_scale: (ceil(n_blocks / 256),) float32 absmax of each block of 256 centred scales.
        scales_mean: () float32, the mean block absmax subtracted before quantising.
        shape: Shape of the original weight.
        block_size: Values per NF4 block.
    """

    packed: torch.Tensor
    scales_q: torch.Tensor
    scales_scale: torch.Tensor
    scales_mean: torch.Tensor
    shape: tuple[int, ...]
    block_size: int = BLOCK_SIZE

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of storage, scales included."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_q, self.scales_scale)) + 4


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -x.numel() % multiple
    return F.pad(x, (0, pad)) if pad else x


def quantize_nf4(w: torch.Tensor, block_size: int = BLOCK_SIZE, dq_block_size: int = DQ_BLOCK_SIZE) -> NF4Tensor:
    """Quantise ``w`` (any shape, any float dtype) to NF4 with double-quantised absmax scales."""
    flat = _pad_to(w.detach().reshape(-1).float(), block_size)
    blocks = flat.view(-1, block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]
    index = torch.bucketize(normed, _MIDPOINTS.to(w.device)).to(torch.uint8).view(-1)  # (n,) in 0..15
    index = _pad_to(index, 2)
    packed = (index[0::2] << 4) | index[1::2]  # (n / 2,)
    # second level: int8 codes of the centred scales, one float32 absmax per 256 of them
    mean = absmax.mean()
    centred = _pad_to(absmax - mean, dq_block_size).view(-1, dq_block_size)  # (n_dq, 256)
    scale2 = centred.abs().amax(dim=1)  # (n_dq,)
    q = torch.round(centred / scale2.clamp_min(torch.finfo(torch.float32).tiny)[:, None] * 127)
    scales_q = q.to(torch.int8).view(-1)[: absmax.numel()]
    return NF4Tensor(packed, scales_q, scale2, mean, tuple(w.shape), block_size)


def dequantize_scales(q: NF4Tensor) -> torch.Tensor:
    """The block absmax values recovered from their 8-bit codes, (n_blocks,) float32."""
    n = q.scales_q.numel()
    codes = _pad_to(q.scales_q.float(), DQ_BLOCK_SIZE).view(-1, DQ_BLOCK_SIZE)  # (n_dq, 256)
    return (codes / 127 * q.scales_scale[:, None]).view(-1)[:n] + q.scales_mean


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight back in ``dtype``, shape ``q.shape``."""
    index = torch.stack([q.packed >> 4, q.packed & 15], dim=1).view(-1).long()  # (n_padded,)
    n_blocks = q.scales_q.numel()
    values = _NF4.to(q.packed.device)[index[: n_blocks * q.block_size]].view(n_blocks, q.block_size)
    w = values * dequantize_scales(q)[:, None]  # (n_blocks, block_size)
    return w.view(-1)[: q.numel].view(q.shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """``x W^T`` with W dequantised in forward and again in backward: nothing full-size is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Linear4bit) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantize(grad.dtype), None  # (..., O) . (O, I) -> (..., I)


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored as NF4 (QLoRA); the bias stays in full precision.

    The packed tensors are buffers (``weight_packed``, ``weight_scales_q``, ``weight_scales_scale``,
    ``weight_scales_mean``), so they move with ``.to(device)`` and appear in ``state_dict``.
    """

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size = q.block_size
        self.register_buffer("weight_packed", q.packed)
        self.register_buffer("weight_scales_q", q.scales_q)
        self.register_buffer("weight_scales_scale", q.scales_scale)
        self.register_buffer("weight_scales_mean", q.scales_mean)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Linear4bit:
        """Quantise an ``nn.Linear``."""
        return cls(quantize_nf4(linear.weight), linear.bias, linear.in_features, linear.out_features)

    def quantized(self) -> NF4Tensor:
        return NF4Tensor(
            self.weight_packed,
            self.weight_scales_q,
            self.weight_scales_scale,
            self.weight_scales_mean,
            (self.out_features, self.in_features),
            self.block_size,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (O, I) in ``dtype``."""
        return dequantize_nf4(self.quantized(), dtype)

    @property
    def weight_nbytes(self) -> int:
        """Bytes the quantised weight takes."""
        return self.quantized().nbytes

    @property
    def bytes_per_param(self) -> float:
        """Storage per weight value, scales included (about 0.516 for 4.127 bits)."""
        return self.weight_nbytes / (self.in_features * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., I) -> (..., O), computed in x's dtype."""
        y = _NF4Matmul.apply(x, self)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, block={self.block_size}"


def quantize_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, Linear4bit]:
    """Swap every ``nn.Linear`` of ``model`` (but those named in ``skip``) for a ``Linear4bit``, in place.

    QLoRA quantises the base model's linear layers and keeps the embeddings and output head in
    higher precision; a head tied to the embedding matrix must stay unquantised anyway.

    Returns:
        Name -> new ``Linear4bit``.
    """
    chosen = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and not any(name == s or name.endswith(f".{s}") for s in skip)
        and not {"lora_A", "lora_B"} & set(name.split("."))  # adapters stay in full precision
    ]
    out: dict[str, Linear4bit] = {}
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = Linear4bit.from_linear(getattr(parent, child))
        setattr(parent, child, q)
        out[name] = q
    return out


def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Swap every ``Linear4bit`` back for a linear layer holding its dequantised weight, in place."""
    from evolm.nn.linear import Linear

    for name in [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = getattr(parent, child)
        w = q.dequantize(dtype)
        plain = Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        plain.weight = nn.Parameter(w, requires_grad=False)
        if q.bias is not None:
            plain.bias = nn.Parameter(q.bias.detach().to(dtype), requires_grad=False)
        setattr(parent, child, plain)
