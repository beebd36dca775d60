"""Helpers shared by the command-line tests (tests/test_cli*.py)."""

import subprocess
import sys


def run_cli(*argv, cwd=None):
    """Run ``python -m updatebuffer *argv`` in a child process; return (status, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "updatebuffer", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(err, command, *fragments):
    """A user error: exactly one line on stderr, naming the command, no traceback."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"updatebuffer {command}: "), err
    for fragment in fragments:
        assert fragment in lines[0], err
