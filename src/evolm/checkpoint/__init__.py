"""Reading checkpoints from disk: GGUF, safetensors."""
