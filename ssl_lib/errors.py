"""The errors that mean "the user's input is wrong", as opposed to a bug.

Every command line catches :class:`BadInput` and prints its message, one line naming the field,
file or path and what is wrong, then exits with status 2.
"""


class BadInput(ValueError):
    """Input the package cannot use; the message names it and says what is wrong."""


class ConfigError(BadInput):
    """A config key or value is invalid; the message names the field and the rule."""


class DataError(BadInput):
    """A data source cannot be read as asked (missing or unreadable files, bad layout)."""


class RunDirError(BadInput):
    """A run directory or a saved file the request cannot use; the message names the path."""
