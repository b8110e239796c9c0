"""The library version, written into every checkpoint and exported encoder."""

__version__ = "0.1.0"
