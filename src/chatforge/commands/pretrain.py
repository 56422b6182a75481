"""`chatforge pretrain`: not moved yet; its parser still lives in `chatforge.train.pretrain`."""

from chatforge.train.pretrain import configure  # noqa: F401
