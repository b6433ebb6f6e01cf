"""User-facing errors: one paragraph that names the key or file and the fix, never a traceback."""


class DgtrainError(Exception):
    """A problem with the user's input (config, device, data files). Exits with code 2."""

    exit_code = 2


class NonFiniteLossError(DgtrainError):
    """Training produced a NaN/inf loss. Exits with code 3."""

    exit_code = 3
