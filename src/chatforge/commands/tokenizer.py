"""`chatforge tokenizer`: not moved yet; its parser still lives in `chatforge.data.tokenizer`."""

from chatforge.data.tokenizer import configure  # noqa: F401
