"""compatembed: backward-compatible retrieval embeddings."""

__version__ = "0.1.0"
