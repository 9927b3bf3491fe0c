"""Errors a user can act on. Entry points print their message and exit non-zero without a traceback."""


class AvlmError(Exception):
    """Base class: the message names the bad file, row, key or value."""


class ConfigError(AvlmError):
    """Unknown config key, wrong type or out-of-range value."""


class DataError(AvlmError):
    """Missing data directory, unreadable frame, malformed annotation, leakage across splits."""


class ModelError(AvlmError):
    """Unknown backbone, checkpoint that does not match the architecture."""


class TrainingError(AvlmError):
    """Training cannot go on (e.g. a non-finite loss)."""
