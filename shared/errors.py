"""How commands end early: problems the user can fix, bugs of ours, and stops the user (or a scheduler) asked for."""


class UserError(Exception):
    """A problem with the user's input: the message says what, where, and what to do.

    CLIs print the message (no traceback) and exit with code 1.
    """


class InternalError(Exception):
    """An invariant of ours broke (e.g. processes that must agree do not): a bug to report, not the user's
    mistake. CLIs say so, point at the crash log, and exit with code 2."""


class Stopped(Exception):
    """The command was stopped by a signal (Ctrl-C, a scheduler's SIGTERM) after keeping its work: the message
    says what was kept and how to go on. CLIs print it and exit with 128 + the signal's number (130, 143)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum
