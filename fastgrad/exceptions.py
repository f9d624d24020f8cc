"""Storchastic's ``storch.exceptions``: the exceptions user code catches by that path."""
from ._graph import NoCostError
from ._tensor import IllegalStorchExposeError

__all__ = ["IllegalStorchExposeError", "NoCostError"]
