"""`chatforge prefs`: not moved yet; its parser still lives in `chatforge.train.make_pairs`."""

from chatforge.train.make_pairs import configure  # noqa: F401
