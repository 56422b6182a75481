"""`chatforge eval`: not moved yet; its parser still lives in `chatforge.eval.evaluate`."""

from chatforge.eval.evaluate import configure  # noqa: F401
