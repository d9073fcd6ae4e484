"""Errors that reach users as one clear line (the CLI prints them without a traceback)."""


class LSVCRError(Exception):
    """Base class: the message names the problem and what to do about it."""


class ConfigError(LSVCRError, ValueError):
    """A bad configuration file, key or value."""


class DataError(LSVCRError, ValueError):
    """Bad input data: a missing table or column, a wrong type, unknown ids, leakage."""


class ModelNotFoundError(LSVCRError, FileNotFoundError):
    """A model path or registry name that cannot be loaded offline."""
