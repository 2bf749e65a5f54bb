"""compatembed_index: a mixed-version FAISS gallery service (no torch)."""

__version__ = "0.1.0"
