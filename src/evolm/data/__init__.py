"""The pretraining data pipeline: document sources -> token dataset on disk -> packed batches.

::

    cfg = DataConfig(sources=("shakespeare",), seq_len=256, batch_size=8)
    data = PackedDataset.from_config(cfg, tokenizer, rank, world_size)
    for input_ids, labels, document_ids in data:      # (B, T) int64 each, forever
        logits = model(input_ids, document_ids=document_ids)
    state = data.state_dict()                          # exact resume: data.load_state_dict(state)
"""

from evolm.data.config import DataConfig
from evolm.data.corpus import CorpusStats, DataError, Source, iter_documents
from evolm.data.packing import Batch, PackedDataset, split_documents
from evolm.data.shards import TokenShards, open_shards, prepare_shards, write_shards

__all__ = [
    "Batch",
    "CorpusStats",
    "DataConfig",
    "DataError",
    "PackedDataset",
    "Source",
    "TokenShards",
    "iter_documents",
    "open_shards",
    "prepare_shards",
    "split_documents",
    "write_shards",
]
