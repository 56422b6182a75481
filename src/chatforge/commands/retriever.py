"""`chatforge retriever`: not moved yet; its parser still lives in `chatforge.train.retriever`."""

from chatforge.train.retriever import configure  # noqa: F401
