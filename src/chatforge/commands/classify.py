"""`chatforge classify`: not moved yet; its parser still lives in `chatforge.train.classify`."""

from chatforge.train.classify import configure  # noqa: F401
