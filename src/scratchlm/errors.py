"""The base of every error a user can fix: the command line prints its message alone, with no traceback."""


class UserError(Exception):
    """A problem with the settings, the data, a file or the environment; the message says what, and what to
    do about it."""
