"""`chatforge serve`: not moved yet; its parser still lives in `chatforge.serve.command`."""

from chatforge.serve.command import configure  # noqa: F401
