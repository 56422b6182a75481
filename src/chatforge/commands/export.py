"""`chatforge export`: not moved yet; its parser still lives in `chatforge.model.export`."""

from chatforge.model.export import configure  # noqa: F401
