"""Shared building blocks: the hard, well-tested parts every model family composes."""
