import os
import signal
import sys

import pytest

# The project is a flat set of scripts and modules at the repository root, not an installed package;
# the tests' own helpers are in tests/support.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts training processes or runs a script's main() "
                                       "(python -m pytest -m 'not slow' tests skips them)")


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """Tests that call a script's main() in-process install checkpoint.Preemption's SIGTERM and
    SIGINT handlers, which only set a flag: without this, `timeout` (SIGTERM) or Ctrl-C could no
    longer stop pytest."""
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGTERM, old[0])
    signal.signal(signal.SIGINT, old[1])
