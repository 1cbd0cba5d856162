"""Offline data: tokenizers, corpora read from registry packages, length-bucketed batches."""

from jaxformer.data import batching, corpora, tokenizers

__all__ = ["batching", "corpora", "tokenizers"]
