"""Errors evolm raises for bad input.

Every message names the thing that is wrong (file, tensor, field), what was expected and what
was found, and where it applies, what to do instead.
"""

from __future__ import annotations


class EvolmError(Exception):
    """Base class of every error evolm raises on purpose."""


class ConfigError(EvolmError, ValueError):
    """A configuration field has a value outside what is allowed."""


class CheckpointError(EvolmError):
    """A checkpoint on disk is missing, truncated, unsafe or does not match its config."""


class UnsupportedModelError(CheckpointError):
    """A checkpoint names a model family or architecture evolm does not build."""


class DataError(EvolmError, ValueError):
    """A corpus file or token dataset on disk is malformed (the message names file and line)."""
