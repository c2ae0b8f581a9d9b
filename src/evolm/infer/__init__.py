"""Inference: sampling, KV-cache generation, streaming."""
