"""The user's own images: a folder -> a store (prepare), and features back out (embed, neighbours)."""

from fastclr.ingest.decode import DecodeOptions
from fastclr.ingest.prepare import PrepareResult, prepare_store

__all__ = ["DecodeOptions", "PrepareResult", "prepare_store"]
