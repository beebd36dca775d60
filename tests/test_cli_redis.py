import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from cli_helpers import assert_one_line_error, run_cli

import updatebuffer
from updatebuffer.cli import main
from updatebuffer.testing import servers
from updatebuffer.testing.contract import Recorder
from updatebuffer.testing.servers import free_port

pytestmark = pytest.mark.redis


@pytest.fixture
def url(redis_server, key_prefix):
    return f"{redis_server.url}?key_prefix={key_prefix}&delay=0"


def _stats(url, capsys):
    assert main(["stats", "--json", url]) == 0
    return json.loads(capsys.readouterr().out)


def test_stats_reports_backlog(url, capsys):
    buf = updatebuffer.from_url(url, flush=Recorder())
    for i in range(50):
        buf.incr("g", {"n": 1}, {"id": i % 10})
    buf.close()
    data = _stats(url, capsys)
    assert data["pending_rows"] == 10 and data["updates_accepted"] == 50
    assert main(["stats", url]) == 0
    out = capsys.readouterr().out
    assert "pending_rows" in out and "10" in out


def test_worker_drains_backlog_and_stops_on_sigterm(url, tmp_path, capsys):
    buf = updatebuffer.from_url(url, flush=Recorder())
    for i in range(3000):
        buf.incr("g", {"n": 1}, {"id": i % 1000})
    buf.close()
    (tmp_path / "slowflush.py").write_text(
        textwrap.dedent(
            """
            import json, time
            def flush(batch):
                time.sleep(0.05)
                with open("flushed.jsonl", "a") as f:
                    for u in batch:
                        f.write(json.dumps([u.filters["id"], u.columns["n"]]) + "\\n")
            """
        )
    )
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "updatebuffer",
            "worker",
            url,
            "--flush",
            "slowflush:flush",
            "--interval",
            "0.1",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        backlog = [_stats(url, capsys)["pending_rows"]]
        deadline = time.monotonic() + 60
        while backlog[-1] and time.monotonic() < deadline:
            time.sleep(0.05)
            backlog.append(_stats(url, capsys)["pending_rows"])
        assert backlog[-1] == 0
        assert len(set(backlog)) > 2, f"backlog should shrink step by step: {backlog}"
    finally:
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "stopped after flushing 1,000 rows" in out
    lines = (tmp_path / "flushed.jsonl").read_text().splitlines()
    assert sum(json.loads(line)[1] for line in lines) == 3000


def test_worker_sigterm_mid_batch_finishes_it(url, tmp_path, capsys):
    buf = updatebuffer.from_url(url, flush=Recorder())
    buf.incr("g", {"n": 7}, {"id": 1})
    buf.close()
    (tmp_path / "blocking.py").write_text(
        textwrap.dedent(
            """
            import os, time
            def flush(batch):
                open("started", "w").close()
                time.sleep(1.0)
                with open("done", "w") as f:
                    f.write(str(sum(u.columns["n"] for u in batch)))
            """
        )
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "updatebuffer", "worker", url, "--flush", "blocking:flush"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert (tmp_path / "done").read_text() == "7"
    data = _stats(url, capsys)
    assert data["pending_rows"] == 0 and data["in_flight_batches"] == 0
    assert data["rows_flushed"] == 1


def test_dead_list_replay_purge(url, key_prefix, redis_server, capsys):
    def poison(batch):
        raise RuntimeError("bad row")

    buf = updatebuffer.from_url(url, flush=poison, max_attempts=1, retry_backoff=0)
    buf.incr("g", {"n": 3}, {"id": 1})
    buf.incr("g", {"n": 4}, {"id": 2})
    for _ in range(5):
        buf.drain()
    buf.close()
    assert main(["dead", "list", "--json", url]) == 0
    letters = json.loads(capsys.readouterr().out)
    assert sorted(letter["columns"]["n"] for letter in letters) == [3, 4]
    assert "bad row" in letters[0]["error"]
    assert main(["dead", "list", url]) == 0
    assert "2 dead letters" in capsys.readouterr().out
    assert main(["dead", "replay", url]) == 0
    assert "replayed 2" in capsys.readouterr().out
    rec = Recorder()
    buf = updatebuffer.from_url(url, flush=rec)
    buf.drain()
    assert rec.total("n") == 7
    buf.close()
    assert main(["dead", "purge", url]) == 0
    assert "purged 0" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["stats"], ["stats", "--json"], ["dead", "list"]])
def test_unreachable_server_is_one_line(command):
    dead = f"redis://127.0.0.1:{free_port()}/0?socket_timeout=0.5"
    status, out, err = run_cli(*command, dead)
    assert status == 1
    assert out == ""
    assert_one_line_error(err, command[0], "Connection refused")


@pytest.mark.parametrize("command", [["stats"], ["dead", "list"]])
def test_cluster_url_against_a_dead_node_is_one_line(command):
    status, out, err = run_cli(*command, f"redis+cluster://127.0.0.1:{free_port()}")
    assert status == 1
    assert out == ""
    assert_one_line_error(err, command[0], "Connection refused")


@pytest.mark.parametrize("command", [["stats"], ["dead", "purge"]])
def test_cluster_url_against_a_plain_node_is_one_line(redis_server, command):
    url = f"redis+cluster://{redis_server.host}:{redis_server.port}"
    status, out, err = run_cli(*command, url)
    assert status == 1
    assert out == ""
    assert_one_line_error(err, command[0], "luster")


def test_stats_survives_closed_pipe(url):
    # `updatebuffer stats URL | head -1` must not print a BrokenPipeError traceback.
    proc = subprocess.run(
        f"{sys.executable} -m updatebuffer stats '{url}' | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert "Traceback" not in proc.stderr


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<rest>.*)$")
_RETRY = re.compile(
    r"process_pending failed \((?P<n>\d+) in a row\): .*; retrying in (?P<wait>[\d.]+)s "
    r"\(backoff (?P<nominal>[\d.]+)s, max 0.80s\)$"
)


class _Lines:
    """Collect a child's stream line by line in a thread, so the test can wait for a line."""

    def __init__(self, stream):
        self.lines = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate, what, timeout=60):
        deadline = time.monotonic() + timeout
        while not predicate(list(self.lines)):
            assert time.monotonic() < deadline, f"no {what} in:\n" + "\n".join(self.lines)
            time.sleep(0.05)

    def join(self):
        self._thread.join(timeout=30)


def _flushed_total(path):
    if not path.exists():
        return 0
    return sum(json.loads(line)[1] for line in path.read_text().splitlines())


@pytest.mark.slow
def test_worker_backs_off_while_redis_is_down_and_recovers(tmp_path, capsys):
    """Redis dies under a running worker and comes back: backoff doubles up to the cap, logged
    with timestamps, and the worker flushes everything from before and after by itself."""
    with servers.RedisServer(appendonly=True) as server:
        url = f"{server.url}?key_prefix=backoff&delay=0"
        (tmp_path / "recordflush.py").write_text(
            textwrap.dedent(
                """
                import json
                def flush(batch):
                    with open("flushed.jsonl", "a") as f:
                        for u in batch:
                            f.write(json.dumps([u.filters["id"], u.columns["n"]]) + "\\n")
                """
            )
        )
        flushed = tmp_path / "flushed.jsonl"
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "updatebuffer",
                "worker",
                url,
                "--flush",
                "recordflush:flush",
                "--interval",
                "0.1",
                "--max-backoff",
                "0.8",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        err = _Lines(worker.stderr)
        try:
            buf = updatebuffer.from_url(url, flush=Recorder())
            for i in range(200):
                buf.incr("g", {"n": 1}, {"id": i % 50})
            buf.close()
            deadline = time.monotonic() + 60
            while _flushed_total(flushed) < 200 or _stats(url, capsys)["in_flight_rows"]:
                assert time.monotonic() < deadline, _flushed_total(flushed)
                time.sleep(0.05)

            server.kill()

            def retries(lines):
                return [m for line in lines if (m := _RETRY.search(line))]

            err.wait_for(lambda lines: len(retries(lines)) >= 7, "7 retries")
            server.start()  # same port, same AOF: the acknowledged state is back
            buf = updatebuffer.from_url(url, flush=Recorder())
            for i in range(300):
                buf.incr("g", {"n": 1}, {"id": i % 70})
            buf.close()
            err.wait_for(
                lambda lines: any("backend reachable again after" in line for line in lines),
                "recovery line",
            )
            deadline = time.monotonic() + 60
            while _flushed_total(flushed) < 500:
                assert time.monotonic() < deadline, _flushed_total(flushed)
                time.sleep(0.05)
            final = _stats(url, capsys)
        finally:
            worker.send_signal(signal.SIGTERM)
            out = worker.stdout.read()
            worker.wait(timeout=30)
            err.join()
            worker.stdout.close()
            worker.stderr.close()
    assert worker.returncode == 0, "\n".join(err.lines)
    rows_written = len(flushed.read_text().splitlines())
    assert f"stopped after flushing {rows_written:,} rows" in out
    assert _flushed_total(flushed) == 500
    assert final["pending_rows"] == 0 and final["in_flight_rows"] == 0

    found = retries(err.lines)
    # The first outage's failures count 1, 2, 3... and their nominal backoff doubles from
    # --interval up to --max-backoff; the actual wait is jittered into [nominal/2, nominal].
    first = found[:7]
    assert [int(m["n"]) for m in first] == [1, 2, 3, 4, 5, 6, 7]
    assert [float(m["nominal"]) for m in first] == [0.1, 0.2, 0.4, 0.8, 0.8, 0.8, 0.8]
    for m in found:
        assert float(m["nominal"]) / 2 <= float(m["wait"]) <= float(m["nominal"]), m[0]
    # Every log line carries its time and level.
    for line in err.lines:
        assert _LOG_LINE.match(line), line
    recovered = [line for line in err.lines if "backend reachable again after" in line]
    assert len(recovered) == 1
    assert f"after {len(found)} failed attempts" in recovered[0]


def test_worker_keeps_trying_to_connect_and_stops_on_sigterm(tmp_path):
    """A cluster client connects when it is built: a worker started before its cluster is up
    retries with the same backoff instead of exiting with a traceback."""
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "updatebuffer",
            "worker",
            f"redis+cluster://127.0.0.1:{free_port()}",
            "--flush",
            "json:dumps",
            "--interval",
            "0.1",
            "--max-backoff",
            "0.4",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err = _Lines(worker.stderr)
    try:
        err.wait_for(
            lambda lines: sum("connecting failed" in line for line in lines) >= 4, "4 retries"
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        out = worker.stdout.read()
        worker.wait(timeout=30)
        err.join()
        worker.stdout.close()
        worker.stderr.close()
    assert worker.returncode == 0, "\n".join(err.lines)
    assert out == "updatebuffer worker: stopped before connecting\n"
    nominal = re.findall(
        r"connecting failed \(\d+ in a row\): .*\(backoff ([\d.]+)s", "\n".join(err.lines)
    )
    assert nominal[:4] == ["0.10", "0.20", "0.40", "0.40"]
    assert "Traceback" not in "\n".join(err.lines)
    for line in err.lines:
        assert _LOG_LINE.match(line), line
