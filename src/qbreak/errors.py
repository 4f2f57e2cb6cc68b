"""Errors that carry one line for the user: what is wrong, and which config key or file it concerns."""


class QbreakError(Exception):
    """A bad input (config key, file, model) explained in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def first_line(error: BaseException) -> str:
    """The first line of a library's exception message (its type name if it has none), for quoting in
    a QbreakError."""
    return (str(error).splitlines() or [type(error).__name__])[0]
