"""The detserve engine: requests in, batch-invariant forward passes over a paged KV cache, tokens out."""

__version__ = "0.1.0"
