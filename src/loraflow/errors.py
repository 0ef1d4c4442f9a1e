"""One exception family, so the CLI can print a single clear line and exit non-zero without a
traceback, while library callers can still catch by kind."""


class LoraflowError(Exception):
    """Base of every error loraflow reports to a user. `exit_code` is what the CLI returns."""

    exit_code = 1


class ConfigError(LoraflowError, ValueError):
    """Bad settings or usage; the message names the field path, file or object."""

    exit_code = 2


class DataError(LoraflowError):
    """The dataset source is missing, unreadable, empty or lacks the configured column."""


class ModelError(LoraflowError):
    """The base model cannot be loaded or LoRA cannot be applied to it."""


class TrainingError(LoraflowError):
    """Training stopped (e.g. a non-finite loss); no final adapter was written."""


class StorageError(LoraflowError):
    """Object storage is unreachable, refuses the credentials, or lacks the bucket/object."""


class IntegrityError(StorageError):
    """A downloaded file does not match the checksum its manifest records."""
