"""The one exception type users see as a one-line message."""


class LegoError(ValueError):
    """A user-facing error: bad input, bad file, unsupported request.

    Command-line tools print its message on one line and exit with status 1 (usage errors that click
    detects itself, such as an unknown option, exit with 2); they never show a traceback for it.
    """
