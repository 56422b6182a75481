"""`chatforge ppo`: not moved yet; its parser still lives in `chatforge.train.ppo`."""

from chatforge.train.ppo import configure  # noqa: F401
