"""The one exception type for problems the user can fix (bad config, bad data, bad cache)."""


class UserError(Exception):
    """A problem with the user's input: the message says what, where, and what to do.

    CLIs print the message (no traceback) and exit with code 1.
    """
