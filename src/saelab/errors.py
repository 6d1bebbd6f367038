"""One exception type per user mistake. Messages name the problem and the fix.

The CLI catches :class:`SaelabError` and prints ``error: <message>`` on one line.
"""


class SaelabError(Exception):
    """Base class for every error caused by user input or environment, not by a bug."""


class ConfigError(SaelabError, ValueError):
    """An invalid configuration value (negative L1, width < 1, unknown architecture, ...)."""


class ModelNotAvailableError(SaelabError):
    """The model cannot be loaded (unknown name, or not available offline)."""


class DatasetNotAvailableError(SaelabError):
    """The corpus cannot be loaded (unknown name, or not available offline)."""


class HookError(SaelabError, ValueError):
    """Unknown hook point or layer out of range."""


class StoreError(SaelabError):
    """An activation store is missing, corrupt, truncated, or made for something else."""


class LockedError(SaelabError):
    """Another process holds the folder (run folder, store, cache) this one wants to write."""


class NotWritableError(SaelabError):
    """An output folder or file cannot be written (read-only, permission denied, disk full)."""


class NonFiniteActivationError(StoreError):
    """NaN or inf in activations; the message names the shard and row."""


class RunFolderError(SaelabError):
    """The output folder already holds a run, or a run folder is damaged."""


class CheckpointError(RunFolderError):
    """A checkpoint is missing or damaged."""


class SAEFormatError(SaelabError):
    """A saved SAE folder is missing files or has the wrong names/shapes."""


class PeerError(SaelabError):
    """Rank 0 of a multi-process job failed with this message; rank 0 reports it and the other
    ranks stop quietly."""
