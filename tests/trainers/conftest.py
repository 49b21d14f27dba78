"""The trainers as pip installs them (pinned in tests/trainers/requirements.txt, installed by
run.sh): their functions patched vs unpatched, their own shipped tests under patch(), and a tiny
end-to-end GRPO run. flash-attn cannot be installed without CUDA and OpenRLHF imports it at module
top level: stubs/ holds the names it imports (nothing else is stubbed)."""
import os
import sys

import pytest

STUBS = os.path.join(os.path.dirname(__file__), "stubs")
sys.path.insert(0, STUBS)
PINNED = {"trl": "1.16.0", "verl": "0.9.1", "openrlhf": "0.11.2"}


def require(package: str):
    """The trainer module, or a skip on a machine that has not installed the trainers; in CI (CI set)
    a missing trainer is a failure, never a skip."""
    try:
        return __import__(package)
    except ImportError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{package} is not installed ({error}); ./run.sh test installs the pinned trainers")
