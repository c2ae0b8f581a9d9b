"""Tensor-name mappings shared by the family converters: rename tables and fused projections.

A family whose checkpoint names differ from evolm's (Llama-style) names writes one ``Renames``
table of ``(hf, evolm)`` name pieces; the same table renames in both directions. A family whose
checkpoint fuses several projections into one tensor (``qkv_proj``, ``gate_up_proj``,
``query_key_value``) splits it with ``unfuse`` on load and joins it again with ``fuse`` on save,
passing its own split/join functions: the layouts differ from family to family, the bookkeeping
does not.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch

from evolm.models.config import DecoderConfig
from evolm.models.family import StateDict

_LAYER = "{i}"  # stands for a layer index in a rename table


def _compile(piece: str, anchored: bool) -> tuple[re.Pattern[str], str]:
    """A regex matching ``piece`` (``{i}`` matching a layer index) and the replacement that writes it."""
    parts = piece.split(_LAYER)
    if len(parts) > 2:
        raise ValueError(f"rename piece {piece!r} has more than one {_LAYER}")
    pattern = r"(\d+)".join(re.escape(p) for p in parts)
    return re.compile(("^" if anchored else "") + pattern), r"\g<1>".join(p.replace("\\", "\\\\") for p in parts)


class Renames:
    """An ordered table of HF <-> evolm tensor-name pieces, read in both directions.

    Each pair is ``(hf, evolm)`` literal text in which ``{i}`` stands for a layer index, e.g.
    ``("transformer.h.{i}.ln_1.", "model.layers.{i}.input_layernorm.")``. A name is rewritten by the
    first pair whose side matches it and left as it is when none does, so more specific pieces
    come first (``attn.out_proj.`` before ``attn.``).

    Args:
        *pairs: ``(hf, evolm)`` pieces, most specific first.
        anchored: Match pieces at the start of a name only; otherwise anywhere, replacing every
            occurrence.
    """

    def __init__(self, *pairs: tuple[str, str], anchored: bool = True) -> None:
        compiled = [(_compile(hf, anchored), _compile(ev, anchored)) for hf, ev in pairs]
        self._to_evolm = [(hf[0], ev[1]) for hf, ev in compiled]  # (pattern, replacement)
        self._to_hf = [(ev[0], hf[1]) for hf, ev in compiled]

    @staticmethod
    def _apply(table: list[tuple[re.Pattern[str], str]], name: str) -> str:
        for pattern, repl in table:
            new, n = pattern.subn(repl, name)
            if n:
                return new
        return name

    def to_evolm(self, name: str) -> str:
        """The evolm name of HF tensor ``name``."""
        return self._apply(self._to_evolm, name)

    def to_hf(self, name: str) -> str:
        """The HF name of evolm tensor ``name``."""
        return self._apply(self._to_hf, name)

    def state_from_hf(self, state: Mapping[str, torch.Tensor], cfg: DecoderConfig | None = None) -> StateDict:
        """``state`` with every name renamed HF -> evolm (tensors untouched, order kept); ``cfg`` is
        unused, the signature is ``Family.state_from_hf``'s."""
        return {self.to_evolm(k): v for k, v in state.items()}

    def state_to_hf(self, state: Mapping[str, torch.Tensor], cfg: DecoderConfig | None = None) -> StateDict:
        """``state`` with every name renamed evolm -> HF (tensors untouched, order kept); ``cfg`` is
        unused, the signature is ``Family.state_to_hf``'s."""
        return {self.to_hf(k): v for k, v in state.items()}


def unfuse(
    state: Mapping[str, torch.Tensor],
    fused: str,
    parts: Sequence[str],
    split: Callable[[str, torch.Tensor], Sequence[torch.Tensor]],
    params: tuple[str, ...] = ("weight", "bias"),
) -> StateDict:
    """Split every fused projection ``<prefix>.<fused>.<param>`` into ``<prefix>.<part>.<param>``.

    Args:
        state: Tensors by name.
        fused: The fused module's name relative to its parent, e.g. ``"self_attn.qkv_proj"``.
        parts: The modules it splits into, in the order ``split`` returns them.
        split: ``(name, tensor) -> one tensor per part``; the family's layout (and its shape checks).
        params: The parameters (``weight``, ``bias``) that are fused.

    Returns:
        ``state`` with each fused tensor replaced, in place, by its parts; other tensors as they are.
    """
    out: StateDict = {}
    for name, t in state.items():
        head, _, param = name.rpartition(".")
        if param not in params or not head.endswith(f".{fused}"):
            out[name] = t
            continue
        prefix = head.removesuffix(f".{fused}")
        for part, piece in zip(parts, split(name, t), strict=True):
            out[f"{prefix}.{part}.{param}"] = piece
    return out


def fuse(
    state: Mapping[str, torch.Tensor],
    parts: Sequence[str],
    fused: str,
    join: Callable[[list[torch.Tensor]], torch.Tensor],
    params: tuple[str, ...] = ("weight", "bias"),
) -> StateDict:
    """Inverse of ``unfuse``: ``<prefix>.<part>.<param>`` for every part -> one ``<prefix>.<fused>.<param>``.

    Args:
        state: Tensors by name.
        parts: The modules that are fused, in the order ``join`` takes them.
        fused: The fused module's name relative to its parent.
        join: Concatenates the parts' tensors in the family's layout.
        params: The parameters (``weight``, ``bias``) that are fused.

    Returns:
        ``state`` with each group of parts replaced by the fused tensor where the first part was.
    """
    out: StateDict = {}
    for name, t in state.items():
        head, _, param = name.rpartition(".")
        part = next((p for p in parts if head.endswith(f".{p}")), None) if param in params else None
        if part is None:
            out[name] = t
        elif part == parts[0]:
            prefix = head.removesuffix(f".{part}")
            out[f"{prefix}.{fused}.{param}"] = join([state[f"{prefix}.{p}.{param}"] for p in parts])
        # the other parts were joined with the first
    return out
