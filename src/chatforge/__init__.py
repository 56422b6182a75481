"""chatforge: build a ChatGPT-style support assistant from a company's own material."""

__version__ = "0.1.0"
