"""`chatforge generate`: not moved yet; its parser still lives in `chatforge.infer.generate`."""

from chatforge.infer.generate import configure  # noqa: F401
