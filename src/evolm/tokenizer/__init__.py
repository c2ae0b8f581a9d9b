"""Tokenizers: Hugging Face ``tokenizer.json`` files and GGUF vocabularies behind one wrapper."""

from evolm.tokenizer.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
