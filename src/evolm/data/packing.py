"""Packing a token dataset into fixed-length training rows, with document ids, shuffling, DDP
sharding and an exact, resumable data position.

Notation: D documents, T = ``seq_len``, B = ``batch_size`` (rows per rank), W = world size,
G = B * W rows per global batch.

Each epoch the training documents are shuffled and concatenated into one stream of L tokens,
which is cut into windows of T + 1 tokens that overlap by one::

    stream    | doc 7 ......... EOS | doc 2 ..... EOS | doc 9 ............ EOS | doc 4 ...
    window 0  [0 ........... T]
    window 1                 [T ........... 2T]
    window 2                               [2T ........... 3T]

Row ``x`` of a window gives ``input_ids = x[:-1]`` and ``labels = x[1:]``, so every stream token
but the first is a label exactly once per epoch, and no (token, next token) pair is lost at a
window edge. Windows run across document boundaries (packing, no padding); ``document_ids``
name each input token's document (global document index), so that the model's attention stays
inside documents (intra-document masking, Llama 3; Dubey et al., 2024). An EOS belongs to the
document it ends, so its label is the next document's first token, predicted from the
ending document's context alone.

What an epoch leaves out: the stream's last ``(L - 1) mod T`` tokens (fewer than T), and the
``n mod G`` windows (n = (L - 1) // T) that do not fill a last global batch. Both are drawn anew
each epoch, because document order and window order are reshuffled with seed + epoch.

Global batch s of epoch e holds windows ``perm_e[s*G:(s+1)*G]``; rank r takes rows
``[r*B, (r+1)*B)`` of it. The sequence of global batches depends on G only, so 2 ranks with
B = b see, together, exactly what 1 rank with B = 2b sees, and a data position (epoch, step)
saved at one world size resumes at another with the same G.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from evolm.data.config import DataConfig
from evolm.data.shards import TokenShards, prepare_shards
from evolm.errors import ConfigError
from evolm.tokenizer import Tokenizer


class Batch(NamedTuple):
    """One batch of packed rows, all (B, T) int64.

    Attributes:
        input_ids: Tokens fed to the model.
        labels: The next token of each input token.
        document_ids: Document index of each input token (pass to the model's ``document_ids``).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    document_ids: torch.Tensor


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split document indices into train and validation sets, whole documents only.

    ``round(val_fraction * n_docs)`` documents (at least one when ``val_fraction > 0``) drawn by a
    permutation seeded with ``seed`` go to validation.

    Returns:
        (train, validation) sorted int64 index arrays.

    Raises:
        ConfigError: the split would leave no training document.
    """
    n_val = round(val_fraction * n_docs)
    if val_fraction > 0:
        n_val = max(n_val, 1)
    if n_val >= n_docs:
        raise ConfigError(
            f"val_fraction={val_fraction} of {n_docs} documents leaves no training document; lower it or add data"
        )
    perm = np.random.default_rng(seed).permutation(n_docs)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


class _Stream:
    """Documents concatenated in a given order; windows read by stream position."""

    def __init__(self, shards: TokenShards, docs: np.ndarray) -> None:
        self.shards = shards
        self.docs = docs  # (n,) document indices in stream order
        self.starts = np.zeros(len(docs) + 1, dtype=np.int64)  # (n + 1,) stream position of each document
        np.cumsum(shards.doc_lengths()[docs], out=self.starts[1:])

    @property
    def n_tokens(self) -> int:
        return int(self.starts[-1])

    def windows(self, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and document ids of the windows ``[s, s + length)`` for each s in ``starts``.

        Returns:
            tokens (R, length) int64 and document ids (R, length) int64.
        """
        pos = starts[:, None] + np.arange(length)  # (R, length) stream positions
        j = np.searchsorted(self.starts, pos, side="right") - 1  # (R, length) index into self.docs
        doc = self.docs[j]
        index = self.shards.offsets[doc] + (pos - self.starts[j])  # (R, length) positions in tokens.bin
        tokens = np.asarray(self.shards.tokens[index.ravel()], dtype=np.int64).reshape(pos.shape)
        return tokens, doc


def _to_batch(tokens: np.ndarray, docs: np.ndarray) -> Batch:
    t = torch.from_numpy(tokens)  # (R, T + 1)
    d = torch.from_numpy(np.ascontiguousarray(docs[:, :-1]))  # (R, T)
    return Batch(input_ids=t[:, :-1].contiguous(), labels=t[:, 1:].contiguous(), document_ids=d)


class PackedDataset:
    """Packed, shuffled, rank-sharded training batches over a token dataset, and fixed validation batches.

    Iterating yields ``Batch`` objects forever, epoch after epoch; ``epoch`` and ``step`` say which
    comes next, and ``state_dict`` / ``load_state_dict`` save and restore that position exactly.

    Args:
        shards: The token dataset.
        cfg: Sequence length, batch size, split and seeds (``cfg.sources`` is not read here).
        rank: This process's rank in [0, world_size).
        world_size: Number of data-parallel ranks W.

    Raises:
        ConfigError: bad rank/world size, or too little data for one global batch or one validation window.
    """

    def __init__(self, shards: TokenShards, cfg: DataConfig, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")
        self.shards = shards
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.train_docs, self.val_docs = split_documents(shards.n_docs, cfg.val_fraction, cfg.split_seed)
        lengths = shards.doc_lengths()
        self.n_train_tokens = int(lengths[self.train_docs].sum())
        self.sequences_per_epoch = max(self.n_train_tokens - 1, 0) // cfg.seq_len
        self.global_batch_size = cfg.batch_size * world_size
        self.steps_per_epoch = self.sequences_per_epoch // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training split has {self.n_train_tokens} tokens, {self.sequences_per_epoch} windows of "
                f"seq_len + 1 = {cfg.seq_len + 1}; one global batch needs batch_size * world_size = "
                f"{self.global_batch_size}; lower seq_len or batch_size, or add data"
            )
        self._val = _Stream(shards, self.val_docs)
        self.validation_sequences = max(self._val.n_tokens - 1, 0) // cfg.seq_len
        if len(self.val_docs) and self.validation_sequences == 0:
            raise ConfigError(
                f"the validation split has {self._val.n_tokens} tokens, fewer than seq_len + 1 = {cfg.seq_len + 1}; "
                "raise val_fraction or lower seq_len"
            )
        self.epoch = 0
        self.step = 0
        self._order: tuple[int, _Stream, np.ndarray] | None = None

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Tokenizer, rank: int = 0, world_size: int = 1) -> PackedDataset:
        """Tokenize ``cfg.sources`` (once; cached, see ``prepare_shards``) and pack them."""
        return cls(prepare_shards(cfg.sources, tokenizer, cfg.dataset_dir), cfg, rank, world_size)

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The document order and window order of ``epoch``, both drawn from ``default_rng(seed + epoch)``.

        Returns:
            (training document indices in stream order, permutation of the epoch's window indices).
        """
        rng = np.random.default_rng(self.cfg.seed + epoch)
        docs = rng.permutation(self.train_docs)
        return docs, rng.permutation(self.sequences_per_epoch)

    def _epoch(self, epoch: int) -> tuple[_Stream, np.ndarray]:
        if self._order is None or self._order[0] != epoch:
            docs, windows = self.epoch_order(epoch)
            self._order = (epoch, _Stream(self.shards, docs), windows)
        return self._order[1], self._order[2]

    def batch(self, epoch: int, step: int) -> Batch:
        """This rank's rows of global batch ``step`` of ``epoch``: a pure function of the position.

        Returns:
            ``Batch`` of (B, T) int64 tensors.
        """
        if not 0 <= step < self.steps_per_epoch or epoch < 0:
            raise IndexError(f"epoch {epoch}, step {step}: steps run from 0 to {self.steps_per_epoch - 1}")
        stream, windows = self._epoch(epoch)
        b = self.cfg.batch_size
        first = step * self.global_batch_size + self.rank * b
        starts = windows[first : first + b].astype(np.int64) * self.cfg.seq_len  # (B,) stream positions
        return _to_batch(*stream.windows(starts, self.cfg.seq_len + 1))

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        out = self.batch(self.epoch, self.step)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        """The data position (the next batch is ``batch(epoch, step)``) and what it depends on."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.cfg.seed,
            "split_seed": self.cfg.split_seed,
            "val_fraction": self.cfg.val_fraction,
            "seq_len": self.cfg.seq_len,
            "global_batch_size": self.global_batch_size,
            "dataset_sha256": self.shards.meta["sha256"],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position: the next batches are exactly those that would have come.

        Raises:
            ConfigError: the state was saved with another dataset, split, seed, sequence length or
                global batch size (the world size may differ when the global batch size does not).
        """
        mine = self.state_dict()
        for key in ("dataset_sha256", "seed", "split_seed", "val_fraction", "seq_len", "global_batch_size"):
            if state.get(key) != mine[key]:
                raise ConfigError(
                    f"data state was saved with {key}={state.get(key)!r}, this loader has {key}={mine[key]!r}; "
                    "resume with the same data configuration"
                )
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ConfigError(f"data state epoch={epoch}, step={step} outside 0 <= step < {self.steps_per_epoch}")
        self.epoch, self.step = epoch, step

    def iter_validation(self, batch_size: int | None = None) -> Iterator[Batch]:
        """The validation batches: validation documents in index order, windows as in training, no shuffling.

        Windows are dealt to ranks round-robin (rank r takes windows r, r + W, ...); the last
        batch may be smaller. For an exact mean loss, sum token losses and counts over ranks.

        Args:
            batch_size: Rows per batch (default ``cfg.batch_size``).

        Raises:
            ConfigError: there is no validation split (``val_fraction`` is 0).
        """
        if not len(self.val_docs):
            raise ConfigError("no validation split: val_fraction=0; set val_fraction > 0")
        bs = self.cfg.batch_size if batch_size is None else batch_size
        if bs < 1:
            raise ConfigError(f"batch_size={bs} must be >= 1")
        mine = np.arange(self.rank, self.validation_sequences, self.world_size, dtype=np.int64)
        for i in range(0, len(mine), bs):
            yield _to_batch(*self._val.windows(mine[i : i + bs] * self.cfg.seq_len, self.cfg.seq_len + 1))
