import os
import signal
import sys

import pytest

# The project is a flat set of scripts and modules at the repository root, not an installed package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _restore_sigterm():
    """Tests that call a script's main() in-process install common.Preemption's SIGTERM handler,
    which only sets a flag: without this, `timeout` (SIGTERM) could no longer stop pytest."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)
