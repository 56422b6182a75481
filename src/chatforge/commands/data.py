"""`chatforge data`: not moved yet; its parser still lives in `chatforge.data.commands`."""

from chatforge.data.commands import configure  # noqa: F401
