"""The one exception type for problems the user can fix (bad config, bad data, bad cache)."""


class UserError(Exception):
    """A problem with the user's input: the message says what, where, and what to do.

    CLIs print the message (no traceback) and exit with code 1.
    """


class InternalError(Exception):
    """An invariant of ours broke (e.g. processes that must agree do not): a bug to report, not the user's
    mistake. CLIs say so, point at the crash log, and exit with code 2."""
