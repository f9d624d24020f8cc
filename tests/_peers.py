"""Peers the tests compare against (verl, TRL): imported when installed; skipped on a developer's machine without
them, a failure under CI (``CI=true``), where ``scripts/setup.sh`` installs them, so a comparison never skips itself
into passing there."""
import importlib
import os

import pytest


def require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"{module} is not importable under CI ({e}); scripts/setup.sh installs it") from e
        pytest.skip(f"{module} not installed ({e}); scripts/setup.sh installs it")
