"""The one exception type for bad user input: the CLI prints its message and exits non-zero."""


class LayerSelError(ValueError):
    """A bad value from the user: the message names the value and how to fix it."""
