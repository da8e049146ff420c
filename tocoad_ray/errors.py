"""One error hierarchy for everything a user can get wrong (no heavy imports: the CLI and the
service's light processes import it).

``TocoadError`` is what the CLI turns into one line on stderr and exit code 2; anything else is a
bug and keeps its traceback. Subclasses also derive from the built-in class callers already catch
(``ValueError`` for bad values, ``RuntimeError`` for bad state), so ``except ValueError`` still works.
"""
from __future__ import annotations


class TocoadError(Exception):
    """Base of every user-facing error: the message names the problem and what to do."""


class ConfigError(TocoadError, ValueError):
    """A configuration value or file is invalid."""


class DataError(TocoadError, ValueError):
    """A data set, image or split cannot be read or is unusable."""


class ArtifactError(TocoadError, RuntimeError):
    """A saved artifact is missing, corrupt or does not match what is asked of it."""


class CheckpointError(TocoadError, RuntimeError):
    """A training checkpoint is missing, corrupt or belongs to another configuration."""


class WeightsError(TocoadError, RuntimeError):
    """Pretrained backbone weights are missing or do not fit the backbone."""


class StorageError(TocoadError, RuntimeError):
    """A storage location is unreachable, or not shared where the cluster needs it."""


class ModelError(TocoadError, ValueError):
    """An exported model file is missing, corrupt or not one of ours."""
