"""The one user-facing error type.

Raise `ChatforgeError` for anything the user can fix (bad input, bad option, missing file):
the message says what is wrong and how to fix it. The CLI prints it without a traceback and
exits with code 2. Anything else is a bug and keeps its traceback.
"""


class ChatforgeError(Exception):
    """An error in the user's input or options; `str(err)` tells them what to fix."""

    exit_code = 2
