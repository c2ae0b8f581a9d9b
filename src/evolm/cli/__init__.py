"""The ``evolm`` command line."""
