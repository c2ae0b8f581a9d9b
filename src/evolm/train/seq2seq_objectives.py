"""Denoising objectives for encoder-decoder pretraining, as hooks of the pretraining loop.

* ``SpanCorruptionObjective``: T5's span corruption (Raffel et al., 2020, section 3.1.4): 15% of
  the tokens, in spans of mean length 3, are dropped from the input, each span replaced by one
  sentinel; the target lists the sentinels each followed by the tokens it hides::

      input   Thank you <X> me to your party <Y> week .
      target  <X> for inviting <Y> last

* ``TextInfillingObjective``: BART's text infilling (Lewis et al., 2020, section 2.2): spans with
  Poisson(3) lengths covering 30% of the tokens are each replaced by a single ``<mask>`` (a span
  of length 0 inserts one), so the model also learns how many tokens are missing; the target is
  the whole original text.

Both read a packed window of the corpus (``Batch.input_ids``) as one text, as T5 does with its
concatenated documents, and produce ``model(input_ids, attention_mask=..., decoder_input_ids=...)``
inputs with ``labels`` aligned to the decoder positions. Special ids come from the model config:
sentinels count down from the top of the vocabulary (T5's ``<extra_id_0>`` is the highest id),
BART's ``<mask>`` is its last id. Train with a tokenizer that leaves those ids unused (fewer
tokens than ``vocab_size``); ``prepare`` refuses batches that reach them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from evolm.data.packing import Batch
from evolm.errors import ConfigError
from evolm.nn.losses import cross_entropy_sum
from evolm.train.objectives import Prepared


def span_corruption_lengths(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> dict:
    """Token counts of span corruption of ``length`` tokens, as T5's ``random_spans_noise_mask``
    computes them.

    Returns:
        ``noise`` (tokens hidden), ``spans`` (noise spans = sentinels), ``inputs`` (non-noise tokens
        plus one sentinel per span) and ``targets`` (noise tokens plus one sentinel per span); EOS
        tokens, when appended, come on top.
    """
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = max(round(noise / mean_span_length), 1)
    return {"noise": noise, "spans": spans, "inputs": length - noise + spans, "targets": noise + spans}


def _random_segmentation(n_items: int, n_segments: int, generator: torch.Generator | None) -> torch.Tensor:
    """Split ``n_items`` into ``n_segments`` non-empty segments uniformly at random: their lengths."""
    first = torch.zeros(n_items, dtype=torch.long)
    cuts = torch.randperm(n_items - 1, generator=generator)[: n_segments - 1] + 1  # segment starts after item 0
    first[cuts] = 1
    segment = torch.cumsum(first, 0)  # (n_items,) segment id of each item
    return torch.bincount(segment, minlength=n_segments)


def random_spans_noise_mask(
    length: int, noise_density: float = 0.15, mean_span_length: float = 3.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """T5's noise mask: (length,) bool, True on noise; alternating non-noise and noise spans, the
    first span never noise, with the counts of ``span_corruption_lengths``."""
    n = span_corruption_lengths(length, noise_density, mean_span_length)
    noise_lengths = _random_segmentation(n["noise"], n["spans"], generator)
    keep_lengths = _random_segmentation(length - n["noise"], n["spans"], generator)
    interleaved = torch.stack([keep_lengths, noise_lengths], dim=1).flatten()  # (2 * spans,) keep, noise, ...
    is_noise = torch.repeat_interleave(torch.arange(2 * n["spans"]) % 2 == 1, interleaved)
    return is_noise


def _shift_right(labels: torch.Tensor, start: int) -> torch.Tensor:
    """Decoder inputs: ``start`` then the targets but the last, (B, T) -> (B, T)."""
    return torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)


class _Seq2SeqLoss:
    """Cross-entropy of the decoder logits against ``labels``, shared by both objectives."""

    def loss_sum(
        self, model: nn.Module, prepared: Prepared, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(**{k: v.to(device) for k, v in prepared.inputs.items()})  # (B, T, V)
        loss, _ = cross_entropy_sum(logits, prepared.targets["labels"].to(device))
        return loss, {}


class SpanCorruptionObjective(_Seq2SeqLoss):
    """T5 span corruption with sentinels from the top of the vocabulary.

    Args:
        vocab_size: The model's vocabulary; sentinel k is ``vocab_size - 1 - k``.
        decoder_start_token_id: First decoder input.
        eos_token_id: Appended to inputs and targets, as T5 does; None appends nothing.
        noise_density: Share of tokens hidden (T5: 0.15).
        mean_span_length: Mean noise span length (T5: 3).
    """

    name = "span_corruption"

    def __init__(
        self,
        vocab_size: int,
        decoder_start_token_id: int,
        eos_token_id: int | None = None,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
    ) -> None:
        if not 0.0 < noise_density < 1.0 or mean_span_length < 1.0:
            raise ConfigError(
                f"span corruption noise_density={noise_density} must be in (0, 1) and "
                f"mean_span_length={mean_span_length} >= 1"
            )
        self.vocab_size, self.start, self.eos = vocab_size, decoder_start_token_id, eos_token_id
        self.noise_density, self.mean_span_length = noise_density, mean_span_length

    def corrupt(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """Inputs (I,) and targets (L,) of one row of tokens (T,)."""
        noise = random_spans_noise_mask(tokens.shape[0], self.noise_density, self.mean_span_length, generator)
        starts = noise & ~torch.cat([torch.zeros(1, dtype=torch.bool), noise[:-1]])  # (T,) first token of a span
        sentinel = self.vocab_size - torch.cumsum(starts.long(), 0)  # span k -> vocab - 1 - k
        # inputs: non-noise tokens, each noise span replaced by its sentinel
        inputs = torch.where(starts, sentinel, tokens)[~noise | starts]
        # targets: each span's sentinel then its tokens (non-noise tokens dropped)
        first_keep = ~noise & torch.cat([torch.ones(1, dtype=torch.bool), noise[:-1]])  # a keep span starts
        keep_id = self.vocab_size - torch.cumsum(first_keep.long(), 0)  # keep span k precedes noise span k
        targets = torch.where(first_keep, keep_id, tokens)[noise | first_keep]
        if self.eos is not None:
            eos = torch.tensor([self.eos])
            inputs, targets = torch.cat([inputs, eos]), torch.cat([targets, eos])
        return inputs, targets

    def prepare(self, batch: Batch, generator: torch.Generator | None = None) -> Prepared:
        tokens = batch.input_ids  # (B, T)
        n = span_corruption_lengths(tokens.shape[1], self.noise_density, self.mean_span_length)
        lowest = self.vocab_size - n["spans"]
        if int(tokens.max()) >= lowest:
            raise ConfigError(
                f"token id {int(tokens.max())} collides with the span-corruption sentinels (ids {lowest}.."
                f"{self.vocab_size - 1}, the top of the model's vocabulary); train with a tokenizer of at most "
                f"{lowest} tokens (train.tokenizer)"
            )
        rows = [self.corrupt(row, generator) for row in tokens]
        inputs = torch.stack([r[0] for r in rows])  # (B, I): every row has the same counts
        labels = torch.stack([r[1] for r in rows])  # (B, L)
        return Prepared(
            inputs={"input_ids": inputs, "decoder_input_ids": _shift_right(labels, self.start)},
            targets={"labels": labels},
            count=labels.numel(),
        )


class TextInfillingObjective(_Seq2SeqLoss):
    """BART text infilling: Poisson-length spans, each replaced by one mask token.

    Args:
        mask_token_id: The ``<mask>`` id.
        decoder_start_token_id: First decoder input.
        pad_token_id: Fill of shorter input rows (masked out by ``attention_mask``).
        mask_ratio: Share of tokens masked (BART: 0.3).
        poisson_lambda: Mean span length (BART: 3).
    """

    name = "text_infilling"

    def __init__(
        self,
        mask_token_id: int,
        decoder_start_token_id: int,
        pad_token_id: int = 0,
        mask_ratio: float = 0.3,
        poisson_lambda: float = 3.0,
    ) -> None:
        if not 0.0 < mask_ratio < 1.0 or poisson_lambda <= 0.0:
            raise ConfigError(
                f"text infilling mask_ratio={mask_ratio} must be in (0, 1) and poisson_lambda={poisson_lambda} > 0"
            )
        self.mask, self.start, self.pad = mask_token_id, decoder_start_token_id, pad_token_id
        self.mask_ratio, self.poisson_lambda = mask_ratio, poisson_lambda

    def span_lengths(self, length: int, generator: torch.Generator | None = None) -> list[int]:
        """Poisson span lengths drawn until they cover ``ceil(mask_ratio * length)`` tokens (the
        last one cut to fit)."""
        budget = math.ceil(self.mask_ratio * length)
        spans: list[int] = []
        rate = torch.full((16,), self.poisson_lambda)
        while sum(spans) < budget:
            for s in torch.poisson(rate, generator=generator).long().tolist():
                spans.append(min(s, budget - sum(spans)))
                if sum(spans) >= budget:
                    break
        return spans

    def infill(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The corrupted input (I,) of one row (T,): spans at random starts replaced by one mask each."""
        t = tokens.shape[0]
        spans = self.span_lengths(t, generator)
        starts = torch.randperm(t, generator=generator)[: len(spans)].sort().values.tolist()
        out, pos = [], 0
        for start, n in zip(starts, spans, strict=False):
            start = max(start, pos)  # a span starting inside the previous one continues it
            out.append(tokens[pos:start])
            out.append(torch.tensor([self.mask]))
            pos = min(t, start + n)
        out.append(tokens[pos:])
        return torch.cat(out)

    def prepare(self, batch: Batch, generator: torch.Generator | None = None) -> Prepared:
        tokens = batch.input_ids  # (B, T)
        if int(tokens.max()) >= self.mask:
            raise ConfigError(
                f"token id {int(tokens.max())} reaches the infilling <mask> id {self.mask} (the model's last id); "
                f"train with a tokenizer of at most {self.mask} tokens (train.tokenizer)"
            )
        rows = [self.infill(row, generator) for row in tokens]
        width = max(r.shape[0] for r in rows)
        inputs = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            inputs[i, : r.shape[0]], mask[i, : r.shape[0]] = r, 1
        return Prepared(
            inputs={"input_ids": inputs, "attention_mask": mask, "decoder_input_ids": _shift_right(tokens, self.start)},
            targets={"labels": tokens.clone()},
            count=tokens.numel(),
        )


def _seq2seq_config(model: nn.Module, objective: str):
    cfg = getattr(model, "cfg", None)
    if not getattr(cfg, "is_encoder_decoder", False):
        raise ConfigError(
            f"objective={objective!r} trains encoder-decoder models (t5-tiny, bart-tiny, t5, bart); "
            f"this model is {getattr(cfg, 'family', type(model).__name__)!r}"
        )
    return cfg


def span_corruption(model: nn.Module) -> SpanCorruptionObjective:
    """The span-corruption objective for ``model`` (``OBJECTIVES['span_corruption']``)."""
    cfg = _seq2seq_config(model, "span_corruption")
    return SpanCorruptionObjective(cfg.vocab_size, cfg.decoder_start_token_id, cfg.eos_token_id)


def text_infilling(model: nn.Module) -> TextInfillingObjective:
    """The text-infilling objective for ``model`` (``OBJECTIVES['text_infilling']``)."""
    cfg = _seq2seq_config(model, "text_infilling")
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    return TextInfillingObjective(cfg.vocab_size - 1, cfg.decoder_start_token_id, pad)
