"""`chatforge pipeline`: not moved yet; its parser still lives in `chatforge.pipeline`."""

from chatforge.pipeline import configure  # noqa: F401
