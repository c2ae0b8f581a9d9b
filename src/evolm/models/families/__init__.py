"""One module per model family: HF config and state-dict mapping onto ``DecoderConfig``."""
