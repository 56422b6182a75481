"""`chatforge sft`: not moved yet; its parser still lives in `chatforge.train.sft`."""

from chatforge.train.sft import configure  # noqa: F401
