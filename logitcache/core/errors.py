"""The one exception type users see: a one-line message, exit code 2, no traceback."""


class LogitcacheError(Exception):
    """A problem with the user's input or files, stated as what is wrong and how to fix it."""

    exit_code = 2
