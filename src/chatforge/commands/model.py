"""`chatforge model`: not moved yet; its parser still lives in `chatforge.model.commands`."""

from chatforge.model.commands import configure  # noqa: F401
