"""One exception type per layer. Each carries the file / key / tensor it is about.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``
(2 for usage and configuration errors, 1 for runtime errors).
"""

from __future__ import annotations


class MergeKitBicoError(Exception):
    """Base class of every error the CLI reports as one line."""

    exit_code: int = 1


class ConfigError(MergeKitBicoError):
    """The YAML config is invalid (syntax, unknown key, bad parameter value)."""

    exit_code = 2


class ModelLoadError(MergeKitBicoError):
    """A model folder or weight file cannot be read (missing, corrupt, unsafe)."""


class TensorMismatchError(MergeKitBicoError):
    """Input tensors disagree (missing tensor, shape mismatch)."""


class OutputError(MergeKitBicoError):
    """The output folder cannot be written (exists, unwritable, disk full)."""


class CalibrationError(MergeKitBicoError):
    """Calibration data, loss or statistics are unusable."""


class TransferError(MergeKitBicoError):
    """A task vector cannot be transferred between the given models."""
