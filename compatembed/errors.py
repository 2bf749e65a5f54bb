"""User-facing errors.

Every error a user can cause (a missing path, an unknown class, a checkpoint of another architecture,
a manifest that does not match its weights) is raised as a :class:`CompatEmbedError` subclass with a
message that names the problem. Entry points print that message on one line and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CompatEmbedError(Exception):
    """Base class of errors caused by input (config, data, files), not by a bug."""


class ConfigError(CompatEmbedError):
    """A config value is missing, unknown or inconsistent."""


class DataError(CompatEmbedError):
    """A dataset path, archive, split or class selection is wrong."""


class CheckpointError(CompatEmbedError):
    """Weights do not match the architecture they are loaded into."""


class ManifestError(CompatEmbedError):
    """A model version directory is missing files, corrupt, or inconsistent with its manifest."""


class EvalError(CompatEmbedError):
    """Query and gallery embeddings cannot be compared as asked."""
