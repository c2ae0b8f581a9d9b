"""Tokenized datasets on disk: one flat token array, document offsets and a meta file.

A dataset directory holds::

    tokens.bin    (N,) uint16 (vocab <= 65536) or uint32, little-endian, raw: every document's
                  tokens followed by EOS (when the tokenizer has one), documents back to back
    offsets.npy   (D + 1,) int64: document d is tokens[offsets[d]:offsets[d + 1]]; offsets[D] = N
    meta.json     format, dtype, vocab_size, eos_token_id, n_tokens, n_docs, text_bytes, source,
                  tokenizer fingerprint, sha256 of tokens.bin then offsets.npy's array bytes

``tokens.bin`` is read through a numpy memmap, so a dataset far larger than memory costs
nothing to open (the layout of nanoGPT's ``train.bin``, plus offsets so that packing knows
where documents start). Writing is atomic: everything goes to a temporary sibling folder that
is renamed into place at the end, so a crash never leaves a half-written dataset behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evolm.assets import cache_dir
from evolm.data.corpus import CorpusStats, DataError, Source, as_source, describe_sources, iter_documents
from evolm.tokenizer import Tokenizer

FORMAT = "evolm.tokens/1"
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.npy"
META_FILE = "meta.json"
_log = logging.getLogger(__name__)


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding ids ``0 .. vocab_size - 1``: ``<u2`` up to 65536 ids, else ``<u4``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's serialized ``tokenizer.json`` and its EOS id: equal means same ids."""
    h = hashlib.sha256(tokenizer.backend.to_str().encode("utf-8"))
    h.update(f"\neos={tokenizer.eos_token_id}".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class TokenShards:
    """An opened token dataset.

    Attributes:
        path: Its directory.
        tokens: (N,) uint16/uint32 memmap of every token.
        offsets: (D + 1,) int64 document boundaries.
        meta: The contents of ``meta.json``.
    """

    path: Path
    tokens: np.ndarray
    offsets: np.ndarray
    meta: dict

    @property
    def n_docs(self) -> int:
        """Number of documents D."""
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        """Number of tokens N (EOS included)."""
        return int(self.offsets[-1])

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer that wrote it."""
        return int(self.meta["vocab_size"])

    @property
    def eos_token_id(self) -> int | None:
        """The id appended after each document, or None."""
        return self.meta["eos_token_id"]

    def doc_lengths(self) -> np.ndarray:
        """(D,) int64 tokens per document, EOS included."""
        return np.diff(self.offsets)

    def document(self, index: int) -> np.ndarray:
        """(L,) tokens of document ``index``, EOS included."""
        if not 0 <= index < self.n_docs:
            raise IndexError(f"document {index} out of range: the dataset has {self.n_docs}")
        return np.asarray(self.tokens[self.offsets[index] : self.offsets[index + 1]])

    def verify(self) -> None:
        """Recompute the content hash; raise ``DataError`` if the files were changed since writing."""
        h = hashlib.sha256()
        for start in range(0, self.n_tokens, 1 << 24):
            h.update(np.ascontiguousarray(self.tokens[start : start + (1 << 24)]).tobytes())
        h.update(self.offsets.astype("<i8").tobytes())
        if h.hexdigest() != self.meta["sha256"]:
            raise DataError(f"{self.path}: content hash {h.hexdigest()} differs from meta.json's {self.meta['sha256']}")


def open_shards(path: str | Path) -> TokenShards:
    """Open a dataset directory written by ``write_shards``, checking that its files agree.

    Raises:
        DataError: a file is missing, of the wrong size or format, or the offsets are inconsistent.
    """
    root = Path(path)
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{root} is not a token dataset: no {META_FILE} (write one with evolm.data.write_shards)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{meta_path} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise DataError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    dtype = np.dtype(meta["dtype"])
    n_tokens, n_docs = int(meta["n_tokens"]), int(meta["n_docs"])
    tokens_path = root / TOKENS_FILE
    size = tokens_path.stat().st_size if tokens_path.is_file() else None
    if size != n_tokens * dtype.itemsize:
        raise DataError(
            f"{tokens_path}: {size} bytes, expected n_tokens * itemsize = {n_tokens} * {dtype.itemsize}; "
            "the dataset is truncated or was not written by this version"
        )
    try:
        offsets = np.load(root / OFFSETS_FILE)
    except (OSError, ValueError) as e:
        raise DataError(f"{root / OFFSETS_FILE}: cannot read: {e}") from e
    if (
        offsets.shape != (n_docs + 1,)
        or offsets.dtype != np.int64
        or offsets[0] != 0
        or offsets[-1] != n_tokens
        or np.any(np.diff(offsets) < 0)
    ):
        raise DataError(
            f"{root / OFFSETS_FILE}: expected ({n_docs + 1},) int64 non-decreasing from 0 to {n_tokens}; got "
            f"{offsets.shape} {offsets.dtype}"
        )
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
    return TokenShards(path=root, tokens=tokens, offsets=offsets, meta=meta)


def _batches(documents: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def write_shards(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    source: str = "",
    overwrite: bool = False,
    batch_chars: int = 1 << 22,
    stats: CorpusStats | None = None,
    extra_meta: dict | None = None,
) -> TokenShards:
    """Tokenize documents into a dataset directory.

    Each document is encoded without special tokens (``tokenizer.encode(doc, add_special_tokens=False)``,
    batched through the backend's ``encode_batch_fast``, which runs on all cores) and followed by
    ``tokenizer.eos_token_id`` when there is one.

    Args:
        documents: Texts, one per document.
        tokenizer: The tokenizer; its vocabulary size decides the token dtype.
        out_dir: Directory to create.
        source: Description stored in meta.json.
        overwrite: Replace an existing ``out_dir``; otherwise that is an error.
        batch_chars: Characters per encoding batch (memory vs. parallelism).
        stats: The corpus reader's counts (filled while ``documents`` is consumed), stored in
            meta.json as ``corpus``.
        extra_meta: More keys for meta.json.

    Returns:
        The written dataset, opened.

    Raises:
        DataError: no documents, an id outside the vocabulary, or ``out_dir`` exists.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass overwrite=True or choose another directory")
    vocab_size = tokenizer.vocab_size
    eos = tokenizer.eos_token_id
    if eos is not None and not 0 <= eos < vocab_size:
        raise DataError(f"tokenizer {tokenizer.source}: eos_token_id={eos} outside the vocabulary of {vocab_size}")
    dtype = token_dtype(vocab_size)
    encode = getattr(tokenizer.backend, "encode_batch_fast", tokenizer.backend.encode_batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    t0 = time.perf_counter()
    try:
        digest = hashlib.sha256()
        lengths: list[int] = []
        text_bytes = 0
        with (tmp / TOKENS_FILE).open("wb") as f:
            for batch in _batches(documents, batch_chars):
                text_bytes += sum(len(d.encode("utf-8")) for d in batch)
                flat: list[int] = []
                for enc in encode(batch, add_special_tokens=False):
                    flat.extend(enc.ids)
                    if eos is not None:
                        flat.append(eos)
                    lengths.append(len(enc.ids) + (eos is not None))
                ids = np.asarray(flat, dtype=np.int64)
                if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                    raise DataError(
                        f"tokenizer {tokenizer.source} produced id {int(ids.max())} >= its vocab_size {vocab_size}"
                    )
                data = ids.astype(dtype).tobytes()
                digest.update(data)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not lengths:
            raise DataError(f"no documents to tokenize from {source or 'the given iterable'}")
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(tmp / OFFSETS_FILE, offsets)
        digest.update(offsets.astype("<i8").tobytes())
        meta = {
            "format": FORMAT,
            "dtype": dtype.str,
            "vocab_size": vocab_size,
            "eos_token_id": eos,
            "n_tokens": int(offsets[-1]),
            "n_docs": len(lengths),
            "text_bytes": text_bytes,
            "source": source,
            "tokenizer": tokenizer.source,
            "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
            "sha256": digest.hexdigest(),
            **({"corpus": dict(vars(stats))} if stats is not None else {}),
            **(extra_meta or {}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        seconds = time.perf_counter() - t0
        if out.exists():  # overwrite: move the old one aside, put the new one in place, then delete
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            out.replace(old / out.name)
            tmp.replace(out)
            shutil.rmtree(old)
        else:
            tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log.info(
        "tokenized %d documents, %.1f MB into %d tokens in %.2f s (%.2f MB/s)",
        meta["n_docs"],
        text_bytes / 1e6,
        meta["n_tokens"],
        seconds,
        text_bytes / 1e6 / max(seconds, 1e-9),
    )
    return open_shards(out)


def sources_key(sources: Iterable[Source | str], tokenizer: Tokenizer) -> str:
    """A hash naming a dataset: source specs, the size and mtime of every file they read, the tokenizer."""
    h = hashlib.sha256(FORMAT.encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    for s in map(as_source, sources):
        h.update(f"\n{describe_sources([s])}".encode())
        if s.kind in ("text", "dir", "jsonl"):
            for p in s.files():
                st = p.stat()
                h.update(f"\n{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def prepare_shards(
    sources: Iterable[Source | str], tokenizer: Tokenizer, out_dir: str | Path | None = None
) -> TokenShards:
    """The dataset of ``sources`` under ``tokenizer``, tokenized once and reused after.

    Args:
        sources: ``Source`` objects or spec strings.
        tokenizer: The tokenizer.
        out_dir: Where the dataset lives; default ``cache_dir()/datasets/<key>``, the key hashing
            the sources (with their files' sizes and mtimes) and the tokenizer.

    Raises:
        DataError: ``out_dir`` holds a dataset of other sources or another tokenizer.
    """
    sources = [as_source(s) for s in sources]
    key = sources_key(sources, tokenizer)
    out = Path(out_dir) if out_dir is not None else cache_dir() / "datasets" / key
    if (out / META_FILE).is_file():
        shards = open_shards(out)
        if shards.meta.get("key") != key:
            raise DataError(
                f"{out} holds a dataset of {shards.meta.get('source')!r} (key {shards.meta.get('key')}), not of "
                f"{describe_sources(sources)!r} with this tokenizer (key {key}); delete it or choose another directory"
            )
        return shards
    stats = CorpusStats()
    return write_shards(
        iter_documents(sources, stats),
        tokenizer,
        out,
        source=describe_sources(sources),
        overwrite=out.exists(),
        stats=stats,
        extra_meta={"key": key},
    )
