"""Tokenizers: Hugging Face ``tokenizer.json`` files and GGUF vocabularies behind one wrapper,
and training new ones (byte-level BPE, Unigram)."""

from evolm.tokenizer.tokenizer import Tokenizer, load_tokenizer
from evolm.tokenizer.train import TokenizerTrainConfig, save_tokenizer, train_tokenizer

__all__ = ["Tokenizer", "TokenizerTrainConfig", "load_tokenizer", "save_tokenizer", "train_tokenizer"]
