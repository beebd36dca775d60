"""Helpers shared by the tests that fork (tests/test_fork.py, tests/test_flusher.py)."""

import os
import signal
import time

# Only reached when a child hangs (a lock inherited locked) or a thread never runs.
PATIENCE = 30.0


def wait_child(pid: int) -> int:
    """Exit code of a forked child; a child still alive after PATIENCE is killed (it hung)."""
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -1
