"""Errors that carry one line for the user: what is wrong, and which config key or file it concerns."""


class QbreakError(Exception):
    """A bad input (config key, file, model) explained in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
