"""User-facing errors: each says what is wrong and how to fix it, and is printed without a traceback."""


class SealError(Exception):
    """Base class of the errors `python -m seal_fast.train` reports as one clear message."""

    exit_code = 1


class ConfigError(SealError):
    """A flag or a combination of flags that cannot run."""

    exit_code = 2


class DataError(SealError):
    """A dataset folder, file or image that is missing or broken."""

    exit_code = 2


class NonFiniteLossError(SealError):
    """Training produced a NaN or infinite loss."""

    exit_code = 3
