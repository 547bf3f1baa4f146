"""The one exception type a user is meant to read.

Every check on user input (files, params, checkpoints) raises `TextDiffError` with a single line
that names the file or key and the problem; the CLI prints it without a traceback and exits 1.
Anything else escaping is a bug and keeps its traceback.
"""


class TextDiffError(Exception):
    """A problem with the user's input, described in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
