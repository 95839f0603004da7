"""The one exception type that the CLI turns into a one-line message instead of a traceback."""


class LmforgeError(Exception):
    """A problem with the user's input: the message says what is wrong and what to change."""
