"""Packing: coverage per epoch, document ids, split, determinism, exact resume, rank sharding, validation.

The synthetic datasets give every content token a unique id (document d holds a run of
consecutive word ids), so any token in a batch names the document and place it came from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from evolm.data import DataConfig, PackedDataset, TokenShards, split_documents, write_shards
from evolm.errors import ConfigError
from evolm.models.build import build_model
from evolm.models.presets import preset
from evolm.tokenizer import Tokenizer

N_DOCS = 120


def _documents(n_docs: int = N_DOCS, seed: int = 0) -> list[list[int]]:
    """Word ids of each document: consecutive runs of random length 1..70, unique across documents."""
    lengths = np.random.default_rng(seed).integers(1, 71, size=n_docs)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return [list(range(starts[i], starts[i + 1])) for i in range(n_docs)]


def _write(tmp_path: Path, tok: Tokenizer, name: str) -> tuple[TokenShards, list[list[int]]]:
    docs = _documents()
    sh = write_shards([" ".join(f"w{i}" for i in d) for d in docs], tok, tmp_path / name)
    return sh, docs


@pytest.fixture
def plain(tmp_path: Path, word_tokenizer: Tokenizer) -> tuple[TokenShards, list[list[int]]]:
    """Dataset without EOS: every token id occurs once."""
    return _write(tmp_path, word_tokenizer, "plain")


@pytest.fixture
def with_eos(tmp_path: Path, make_word_tokenizer: Callable) -> TokenShards:
    """Dataset whose documents end in EOS (id 5000)."""
    return _write(tmp_path, make_word_tokenizer(5000, True), "eos")[0]


def _cfg(**changes) -> DataConfig:
    base = {"sources": ("unused.txt",), "seq_len": 16, "batch_size": 2, "val_fraction": 0.1, "seed": 3}
    return DataConfig(**(base | changes))


def _epoch(ds: PackedDataset) -> list:
    return [next(ds) for _ in range(ds.steps_per_epoch)]


def _stream(ds: PackedDataset, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: the epoch's stream built document by document with Python lists."""
    docs, _ = ds.epoch_order(epoch)
    tokens, owner = [], []
    for d in docs:
        tokens += ds.shards.document(int(d)).tolist()
        owner += [int(d)] * len(ds.shards.document(int(d)))
    return np.array(tokens), np.array(owner)


def test_epoch_covers_every_train_token_once(plain: tuple[TokenShards, list[list[int]]]) -> None:
    sh, docs = plain
    ds = PackedDataset(sh, _cfg(batch_size=1))  # G = 1: no windows left over, only the stream tail
    batches = _epoch(ds)
    assert all(b.input_ids.shape == (1, 16) and b.input_ids.dtype == torch.int64 for b in batches)
    labels = torch.cat([b.labels.flatten() for b in batches]).tolist()
    inputs = torch.cat([b.input_ids.flatten() for b in batches]).tolist()
    stream, _ = _stream(ds, 0)
    n = ds.sequences_per_epoch
    assert len(stream) == ds.n_train_tokens and n == (len(stream) - 1) // 16
    tail = len(stream) - 1 - n * 16
    assert 0 <= tail < 16
    # each token but the stream's first (and the < T tail) is a label exactly once
    assert sorted(labels) == sorted(stream[1 : n * 16 + 1].tolist()) and len(set(labels)) == len(labels)
    assert sorted(inputs) == sorted(stream[: n * 16].tolist())
    train_tokens = {t for i in ds.train_docs for t in docs[i]}
    assert set(labels) | {stream[0]} | set(stream[n * 16 + 1 :].tolist()) == train_tokens
    # labels are the inputs shifted by one
    for b in batches:
        assert torch.equal(b.labels[:, :-1], b.input_ids[:, 1:])


def test_windows_and_document_ids_match_reference(with_eos: TokenShards) -> None:
    ds = PackedDataset(with_eos, _cfg(batch_size=3))
    for epoch in (0, 1):
        stream, owner = _stream(ds, epoch)
        _, windows = ds.epoch_order(epoch)
        for step, b in enumerate(_epoch(ds)):
            for row in range(3):
                s = int(windows[step * 3 + row]) * 16
                assert b.input_ids[row].tolist() == stream[s : s + 16].tolist()
                assert b.labels[row].tolist() == stream[s + 1 : s + 17].tolist()
                assert b.document_ids[row].tolist() == owner[s : s + 16].tolist()
    # at every boundary inside a row the last token of the ending document is its EOS
    b = next(ds)
    ids, doc = b.input_ids, b.document_ids
    change = doc[:, 1:] != doc[:, :-1]  # (B, T - 1)
    assert change.any()
    assert (ids[:, :-1][change] == 5000).all()
    # and every input token belongs to the document it is attributed to
    for r in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            assert int(ids[r, t]) in with_eos.document(int(doc[r, t])).tolist()


def test_split_is_by_whole_documents(plain: tuple[TokenShards, list[list[int]]]) -> None:
    sh, docs = plain
    train, val = split_documents(N_DOCS, 0.1, seed=0)
    assert len(val) == 12 and len(train) == 108 and set(train).isdisjoint(val)
    assert sorted([*train, *val]) == list(range(N_DOCS))
    assert np.array_equal(split_documents(N_DOCS, 0.1, seed=0)[1], val)
    assert not np.array_equal(split_documents(N_DOCS, 0.1, seed=1)[1], val)
    assert len(split_documents(5, 0.01, seed=0)[1]) == 1  # a positive fraction holds out at least one
    with pytest.raises(ConfigError, match="leaves no training document"):
        split_documents(1, 0.5, seed=0)
    # the shuffle seed does not move the split; training never sees validation tokens
    a, b = PackedDataset(sh, _cfg(seed=1)), PackedDataset(sh, _cfg(seed=2))
    assert np.array_equal(a.val_docs, b.val_docs)
    val_tokens = {t for i in a.val_docs for t in docs[i]}
    train_seen = {t for batch in _epoch(a) for t in batch.labels.flatten().tolist()}
    val_seen = {t for batch in a.iter_validation() for t in batch.input_ids.flatten().tolist()}
    assert train_seen.isdisjoint(val_tokens) and val_seen <= val_tokens
    assert len(val_seen) >= len(val_tokens) - 16


def test_same_seed_same_batches_new_epoch_new_order(plain: tuple[TokenShards, list[list[int]]]) -> None:
    sh, _ = plain
    a, b = PackedDataset(sh, _cfg()), PackedDataset(sh, _cfg())
    ea0, ea1 = _epoch(a), _epoch(a)
    eb0 = _epoch(b)
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(ea0, eb0, strict=True))
    assert not all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(ea0, ea1, strict=True))
    assert not np.array_equal(a.epoch_order(0)[0], a.epoch_order(1)[0])  # documents reshuffled too
    c = PackedDataset(sh, _cfg(seed=4))
    assert not torch.equal(next(c).input_ids, ea0[0].input_ids)
    assert np.array_equal(c.epoch_order(0)[0], a.epoch_order(1)[0])  # epoch e uses seed + e


def test_resume_mid_epoch_equals_uninterrupted(plain: tuple[TokenShards, list[list[int]]]) -> None:
    sh, _ = plain
    ref = PackedDataset(sh, _cfg())
    spe = ref.steps_per_epoch
    expected = [next(ref) for _ in range(2 * spe + 3)]
    for stop in (0, 5, spe - 1, spe, spe + 7):
        run = PackedDataset(sh, _cfg())
        for _ in range(stop):
            next(run)
        state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint file
        resumed = PackedDataset(sh, _cfg())
        resumed.load_state_dict(state)
        assert (resumed.epoch, resumed.step) == divmod(stop, spe)
        for want in expected[stop : stop + spe + 2]:  # across the next epoch boundary
            got = next(resumed)
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_load_state_rejects_another_configuration(plain: tuple[TokenShards, list[list[int]]]) -> None:
    sh, _ = plain
    state = PackedDataset(sh, _cfg()).state_dict()
    with pytest.raises(ConfigError, match="seed=3, this loader has seed=9"):
        PackedDataset(sh, _cfg(seed=9)).load_state_dict(state)
    with pytest.raises(ConfigError, match="global_batch_size=2, this loader has global_batch_size=4"):
        PackedDataset(sh, _cfg(batch_size=4)).load_state_dict(state)
    with pytest.raises(ConfigError, match="outside"):
        PackedDataset(sh, _cfg()).load_state_dict(state | {"step": 10**6})


@pytest.mark.parametrize(("world", "per_rank"), [(2, 2), (4, 1), (3, 2)])
def test_ranks_split_the_same_global_batches(
    plain: tuple[TokenShards, list[list[int]]], world: int, per_rank: int
) -> None:
    sh, _ = plain
    single = PackedDataset(sh, _cfg(batch_size=world * per_rank))
    ranks = [PackedDataset(sh, _cfg(batch_size=per_rank), rank=r, world_size=world) for r in range(world)]
    assert all(r.steps_per_epoch == single.steps_per_epoch for r in ranks)
    for _ in range(single.steps_per_epoch + 2):
        whole = next(single)
        parts = [next(r) for r in ranks]
        for i, field in enumerate(whole._fields):
            assert torch.equal(torch.cat([p[i] for p in parts]), whole[i]), field
    # a position saved at one world size resumes at another with the same global batch
    moved = PackedDataset(sh, _cfg(batch_size=per_rank), rank=world - 1, world_size=world)
    moved.load_state_dict(single.state_dict())
    assert torch.equal(next(moved).input_ids, next(single).input_ids[-per_rank:])


def test_validation_batches_fixed_and_sharded(plain: tuple[TokenShards, list[list[int]]]) -> None:
    sh, _ = plain
    ds = PackedDataset(sh, _cfg())
    first = list(ds.iter_validation(5))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, ds.iter_validation(5), strict=True))
    rows = torch.cat([b.input_ids for b in first])
    assert rows.shape == (ds.validation_sequences, 16) and first[-1].input_ids.shape[0] <= 5
    next(ds)  # training progress does not move validation
    assert torch.equal(torch.cat([b.input_ids for b in ds.iter_validation(5)]), rows)
    # windows in document order: the first row is the start of the first validation document
    assert rows[0, 0] == int(sh.document(int(ds.val_docs[0]))[0])
    r0, r1 = (PackedDataset(sh, _cfg(), rank=r, world_size=2) for r in (0, 1))
    v0 = torch.cat([b.input_ids for b in r0.iter_validation(3)])
    v1 = torch.cat([b.input_ids for b in r1.iter_validation(3)])
    assert torch.equal(v0, rows[0::2]) and torch.equal(v1, rows[1::2])
    with pytest.raises(ConfigError, match="no validation split"):
        next(PackedDataset(sh, _cfg(val_fraction=0.0)).iter_validation())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seq_len": 0}, "seq_len=0 must be an integer >= 1"),
        ({"batch_size": 2.5}, "batch_size=2.5 must be an integer >= 1"),
        ({"val_fraction": 1.0}, r"val_fraction=1.0 must be in \[0, 1\)"),
        ({"seed": -1}, "seed=-1 must be an integer >= 0"),
        ({"sources": ()}, "sources=() must be a non-empty tuple"),
        ({"sources": ("a.txt?field=x",)}, "sources: source 'a.txt?field=x': option 'field'"),
    ],
)
def test_config_validation_names_field_value_and_range(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("()", r"\(\)")):
        _cfg(**changes)


def test_too_little_data_is_a_clear_error(plain: tuple[TokenShards, list[list[int]]]) -> None:
    sh, _ = plain
    with pytest.raises(ConfigError, match="one global batch needs batch_size \\* world_size = 4096"):
        PackedDataset(sh, _cfg(batch_size=1024), rank=0, world_size=4)
    with pytest.raises(ConfigError, match="validation split has .* fewer than seq_len"):
        PackedDataset(sh, _cfg(seq_len=2000, batch_size=1, val_fraction=0.01))
    with pytest.raises(ConfigError, match="rank=2, world_size=2"):
        PackedDataset(sh, _cfg(), rank=2, world_size=2)


def test_from_config_tokenizes_sources_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_word_tokenizer: Callable
) -> None:
    monkeypatch.setenv("EVOLM_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, d in enumerate(_documents(40)):
        (corpus / f"{i:03d}.txt").write_text(" ".join(f"w{t}" for t in d))
    tok = make_word_tokenizer(5000, True)
    cfg = _cfg(sources=(str(corpus),))
    ds = PackedDataset.from_config(cfg, tok, rank=1, world_size=2)
    assert ds.shards.n_docs == 40 and ds.shards.path.parent == tmp_path / "cache" / "datasets"
    assert PackedDataset.from_config(cfg, tok).shards.path == ds.shards.path
    assert next(ds).input_ids.shape == (2, 16)


def test_document_ids_keep_attention_inside_documents(with_eos: TokenShards) -> None:
    """A packed row through a RoPE model with ``document_ids``: each document's logits equal the
    logits of that document run alone (RoPE sees only relative positions)."""
    model = build_model(preset("llama-10m", vocab_size=5001, n_layers=2, hidden_size=64), seed=0).eval()
    ds = PackedDataset(with_eos, _cfg(seq_len=64, batch_size=1))
    b = next(ds)
    assert len(b.document_ids[0].unique()) >= 2
    with torch.no_grad():
        packed = model(b.input_ids, document_ids=b.document_ids)[0]  # (T, V)
        crossed = model(b.input_ids)[0]
        for d in b.document_ids[0].unique():
            idx = (b.document_ids[0] == d).nonzero().flatten()
            alone = model(b.input_ids[:, idx])[0]
            torch.testing.assert_close(packed[idx], alone, rtol=1e-4, atol=1e-4)
    later = b.document_ids[0] != b.document_ids[0, 0]
    assert not torch.allclose(packed[later], crossed[later], atol=1e-3)  # without ids, documents mix
