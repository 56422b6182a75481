"""`chatforge reward`: not moved yet; its parser still lives in `chatforge.train.reward`."""

from chatforge.train.reward import configure  # noqa: F401
