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


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT reached a training: the run is closed KILLED and the process exits non-zero.

    A ``KeyboardInterrupt`` so that code which lets Ctrl-C through lets it through too; not an ``AvlmError``.
    """

    def __init__(self, signum: int):
        import signal

        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
