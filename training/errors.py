"""Errors that carry a message for the user: the CLI prints them without a traceback and exits 2."""


class UserError(Exception):
    """Bad input or a refused operation; the message says what was wrong and how to fix it."""


class DataError(UserError):
    """A dataset that cannot be read: names the file, field or limit that failed."""
