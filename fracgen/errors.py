"""The one exception users see: the CLI prints its message on one line and exits with code 1."""


class FracgenError(Exception):
    """A bad input or a failed run, described in one line for the person at the keyboard."""
