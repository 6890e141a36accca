"""The version of supervise, in one place: the package face and pyproject read it."""

__version__ = "0.1.0.dev0"
