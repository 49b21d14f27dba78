"""Shared by the trainer tests: the trainers, or a clear skip where they are not installed."""
import os

import pytest

STUBS = os.path.join(os.path.dirname(__file__), "stubs")


def require(package: str):
    """The trainer module, or a skip on a machine that has not installed the trainers; in CI (CI set)
    a missing trainer is a failure, never a skip."""
    try:
        return __import__(package)
    except ImportError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{package} is not installed ({error}); ./run.sh test installs the pinned trainers",
                    allow_module_level=True)
