"""The documentation's code runs as written, so it cannot rot.

Every ```python block of the README and of the SQLAlchemy plugin's README runs in a fresh
interpreter in its own temporary directory. An HTML comment on the line before a block changes
that, visibly in the README source:

- ``<!-- not run: REASON -->``: the block is only compiled (it needs machines we do not have);
  :data:`NOT_RUN` pins how many such blocks each file has, so a new one is a deliberate choice.
- ``<!-- continues the previous block -->``: the block runs after the block before it, in the
  same program (a fragment using the names the example defined).

A block that talks to ``127.0.0.1:6379`` gets a throwaway redis-server of its own instead (the
port is substituted). The README's console walkthrough runs in bash with its port 6400 replaced
by a free one.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from updatebuffer.testing import servers

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PLUGIN_README = ROOT / "plugins" / "updatebuffer-sqlalchemy" / "README.md"
DOCS = (README, PLUGIN_README)

#: Blocks marked ``<!-- not run: ... -->`` per file.
NOT_RUN = {README: 1, PLUGIN_README: 0}

_MARKER = re.compile(r"^<!--\s*(?P<text>.*?)\s*-->$")
_REDIS_DEFAULT = "127.0.0.1:6379"
_WALKTHROUGH_PORT = "6400"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str  # the HTML comment just before the fence, "" if none
    previous: Block | None  # the block of the same language before this one in the file

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def not_run(self) -> bool:
        return self.marker.startswith("not run:")

    @property
    def program(self) -> str:
        """The code to run: with the blocks it continues in front of it."""
        if self.marker == "continues the previous block":
            assert self.previous is not None, f"{self.name}: nothing to continue"
            return self.previous.program + "\n" + self.code
        return self.code


def blocks(path: Path, lang: str) -> list[Block]:
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start = i
        end = lines.index("```", start + 1)
        before = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = _MARKER.match(before.strip())
        if marker and not (
            marker["text"].startswith("not run:")
            or marker["text"] == "continues the previous block"
        ):
            raise AssertionError(f"{path}:{start}: unknown marker {before!r}")
        if fence[1] == lang:
            found.append(
                Block(
                    path=path,
                    line=start + 1,
                    lang=lang,
                    code="\n".join(lines[start + 1 : end]) + "\n",
                    marker=marker["text"] if marker else "",
                    previous=found[-1] if found else None,
                )
            )
        i = end + 1
    return found


PYTHON_BLOCKS = [block for path in DOCS for block in blocks(path, "python")]


@pytest.fixture(scope="module")
def docs_redis():
    """A redis-server of the docs tests' own: the examples use the default key prefix."""
    servers.skip_or_fail_without_redis()
    with servers.RedisServer() as server:
        yield server


def run_python(code: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    script = cwd / "block.py"
    script.write_text(code, encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def expected_prints(code: str) -> list[str]:
    """What ``print(...)  # <python literal>`` lines promise to print, in order."""
    promised = []
    for line in code.splitlines():
        call, sep, comment = line.partition("  # ")
        if sep and call.lstrip().startswith("print("):
            try:
                promised.append(repr(ast.literal_eval(comment.strip())))
            except (ValueError, SyntaxError):
                continue  # prose, not a value
    return promised


def test_the_docs_have_the_blocks_this_module_expects():
    # Guards the parser: an empty list would make every test below pass vacuously.
    for path, least in ((README, 1), (PLUGIN_README, 2)):
        runnable = [b.name for b in PYTHON_BLOCKS if b.path == path and not b.not_run]
        assert len(runnable) >= least, (path, runnable)
    for path, expected in NOT_RUN.items():
        marked = [b.name for b in PYTHON_BLOCKS if b.path == path and b.not_run]
        assert len(marked) == expected, marked


@pytest.mark.parametrize(
    "block", [b for b in PYTHON_BLOCKS if b.not_run], ids=lambda block: block.name
)
def test_blocks_not_run_still_compile(block):
    compile(block.code, block.name, "exec")


@pytest.mark.parametrize(
    "block", [b for b in PYTHON_BLOCKS if not b.not_run], ids=lambda block: block.name
)
def test_python_block_runs(block, tmp_path, request):
    code = block.program
    if _REDIS_DEFAULT in code:
        server = request.getfixturevalue("docs_redis")
        code = code.replace(_REDIS_DEFAULT, f"{server.host}:{server.port}")
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    # Nothing logged either: a callback failure is retried (and logged), not raised.
    assert proc.stderr == ""
    out = proc.stdout.splitlines()
    for value in expected_prints(code):
        assert value in out, f"{block.name} promises to print {value}; it printed {out}"


def test_plugin_example_counts_every_increment(tmp_path):
    [example] = [b for b in PYTHON_BLOCKS if b.path == PLUGIN_README and not b.marker]
    proc = run_python(example.program, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "40000 increments -> times_seen total 40000"


def test_readme_example_also_holds_when_the_flusher_thread_writes(tmp_path):
    """The 30-second example must not depend on the loop finishing before the first flush.

    With ``delay=0`` and a tight interval the Flusher's own thread calls the callback while the
    loop runs (with the README's ``delay=1`` that only happens on a slow machine).
    """
    [example] = [b for b in PYTHON_BLOCKS if b.path == README and "sqlite3" in b.code]
    code = example.program
    for old, new in (("delay=1", "delay=0"), ("interval=0.5", "interval=0.001")):
        assert old in code
        code = code.replace(old, new)
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout == "(10000, 9999.0)\n"


def walkthrough() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Walkthrough") :]
    start = section.index("```console\n") + len("```console\n")
    return section[start : section.index("\n```\n", start) + 1]


def _table_values(out: str, name: str) -> list[str]:
    return re.findall(rf"^{name} +(\S+)$", out, flags=re.MULTILINE)


@pytest.mark.redis
@pytest.mark.slow
def test_readme_walkthrough(tmp_path):
    servers.skip_or_fail_without_redis()
    script = walkthrough()
    assert script.count(_WALKTHROUGH_PORT) == 8
    port = str(servers.free_port())
    script = script.replace(_WALKTHROUGH_PORT, port)
    bindir = str(Path(sys.executable).parent)  # `python` and `updatebuffer` of this venv
    redis_bin = shutil.which("redis-server", path=os.environ.get("PATH"))
    path = os.pathsep.join(
        [bindir, str(Path(redis_bin).parent) if redis_bin else "", os.environ.get("PATH", "")]
    )
    try:
        proc = subprocess.run(
            ["bash", "-e", "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env={**os.environ, "PATH": path},
        )
    finally:
        # The walkthrough's redis-server daemonises: stop it even if the script failed.
        subprocess.run(
            ["redis-cli", "-p", port, "shutdown", "nosave"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    # What the walkthrough's comments promise.
    pending = _table_values(out, "pending_rows")
    assert pending[0] == "20,000"
    assert pending[-1] == "0"
    assert _table_values(out, "updates_accepted")[0] == "100,000"
    assert _table_values(out, "rows_flushed")[-1] == "20,000"
    assert _table_values(out, "in_flight_rows")[-1] == "0"
    batches = re.findall(r"^batch \w{8} attempt 1: (\d+) rows$", out, flags=re.MULTILINE)
    assert sum(map(int, batches)) == 20_000
    assert "updatebuffer worker: stopped after flushing 20,000 rows" in out
    assert "Traceback" not in proc.stderr
