"""Errors that reach the user as one clear line instead of a traceback."""


class RLHFError(Exception):
    """An error caused by input or configuration; the CLI prints it without a traceback."""


class ConfigError(RLHFError):
    """``params.yaml`` (or another config file) is missing, malformed or invalid."""


class DataError(RLHFError):
    """Input data is unusable (for example: every record of a file was rejected)."""
