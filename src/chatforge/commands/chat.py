"""`chatforge chat`: not moved yet; its parser still lives in `chatforge.infer.chat`."""

from chatforge.infer.chat import configure  # noqa: F401
