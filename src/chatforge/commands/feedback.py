"""`chatforge feedback`: not moved yet; its parser still lives in `chatforge.data.feedback_commands`."""

from chatforge.data.feedback_commands import configure  # noqa: F401
