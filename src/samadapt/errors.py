"""The errors a user can fix: a bad file, dataset, configuration or run directory.

Every such error derives from ``SamadaptError``; the ``samadapt`` command prints it in one line (exit status 2).
Anything else (a shape mismatch inside the model, out of memory) is a bug or a resource failure and keeps its
traceback. Each class also derives from the built-in exception it refines, so ``except ValueError`` still catches a
bad configuration value.
"""

from __future__ import annotations


class SamadaptError(Exception):
    """A problem with what the user gave samadapt, named in the message (file, key, value)."""


class ConfigError(SamadaptError, ValueError):
    """A configuration key, option or argument that is unknown, out of range or inconsistent with the others."""


class DataError(SamadaptError, ValueError):
    """An image, label or dataset that cannot be used as given (unreadable, wrong shape, bad labels, bad layout)."""


class InputNotFoundError(SamadaptError, FileNotFoundError):
    """A file or folder the user named (or a dataset lists) does not exist."""


class OutputExistsError(SamadaptError, FileExistsError):
    """An output path that holds something already and must not be overwritten silently."""


class RunError(SamadaptError, ValueError):
    """A run directory, adapter or export that does not match its base model or cannot be read."""


class CheckpointError(SamadaptError, RuntimeError):
    """A model checkpoint that is missing tensors, has the wrong shapes or is not a checkpoint at all."""


class DownloadError(SamadaptError, RuntimeError):
    """Data or weights could not be fetched from the package registries, or their checksum differs."""


class TrainingError(SamadaptError, RuntimeError):
    """Training cannot go on (non-finite loss, no usable data, a checkpoint that cannot be written)."""


class TrainingInterruptedError(TrainingError):
    """SIGINT / SIGTERM ended the run after a resumable checkpoint was written."""


class RunDirectoryBusyError(SamadaptError, RuntimeError):
    """Another process is training into the same run directory."""


class UnsupportedExportError(SamadaptError, ValueError):
    """A run that the ONNX export cannot represent (e.g. MSA's depth branch without --drop-depth)."""
