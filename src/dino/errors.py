"""The one exception type for mistakes a user can fix (bad path, impossible config ...).

The CLI prints its message as one sentence and exits with code 2; the Python API lets it raise.
"""


class DinoError(Exception):
    """A user-fixable error; ``str(err)`` says what is wrong and how to fix it."""
