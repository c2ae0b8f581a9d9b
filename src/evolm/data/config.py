"""The typed configuration of the pretraining data pipeline."""

from __future__ import annotations

from dataclasses import dataclass

from evolm.data.corpus import Source
from evolm.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    """What to train on and how it is cut into batches.

    Attributes:
        sources: Document sources as spec strings (``stdlib``, ``shakespeare``, ``botchan``, a file,
            a directory, a JSONL file; options after ``?``, see ``evolm.data.corpus``).
        seq_len: Tokens per training row T; each packed window holds T + 1 tokens.
        batch_size: Rows per rank per step B; a global batch is B * world_size rows.
        val_fraction: Fraction of documents held out for validation, in [0, 1).
        seed: Shuffling seed; epoch e shuffles with seed + e.
        split_seed: Seed of the train/validation split, apart from ``seed`` so that runs with
            different shuffles share one validation set.
        dataset_dir: Directory of the tokenized dataset; None keeps it in the evolm cache, keyed by
            sources and tokenizer.
    """

    sources: tuple[str, ...] = ("shakespeare",)
    seq_len: int = 256
    batch_size: int = 8
    val_fraction: float = 0.05
    seed: int = 0
    split_seed: int = 0
    dataset_dir: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.sources, str) or not self.sources:
            raise ConfigError(f"sources={self.sources!r} must be a non-empty tuple of source specs")
        object.__setattr__(self, "sources", tuple(self.sources))
        for spec in self.sources:
            if not isinstance(spec, str):
                raise ConfigError(f"sources: {spec!r} is not a string spec")
            try:
                Source.parse(spec)
            except ConfigError as e:
                raise ConfigError(f"sources: {e}") from e
        for name in ("seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction!r} must be in [0, 1)")
        for name in ("seed", "split_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an integer >= 0")
