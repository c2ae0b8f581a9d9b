"""Model definitions: configs, the decoder-only transformer, families and checkpoint interop."""
