"""The peers' code from their pinned wheels for the tests (kl_kernels/tools/wheel_code.py): a missing wheel
skips the test that needs it."""
import pytest

from kl_kernels.tools import wheel_code


def engine_or_skip(package, names, values=None) -> wheel_code.Engine:
    try:
        return wheel_code.Engine(package, names, values)
    except wheel_code.WheelMissing as missing:
        pytest.skip(str(missing))
