import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import updatebuffer
from updatebuffer.cli import main
from updatebuffer.testing.contract import Recorder

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


def test_dead_on_backend_without_dead_letters(capsys):
    assert main(["dead", "list", "direct://"]) == 2
    assert "keeps no dead letters" in capsys.readouterr().err


def test_worker_bad_flush_spec(capsys):
    with pytest.raises(SystemExit) as info:
        main(["worker", "memory://", "--flush", "no_such_module_xyz:flush"])
    assert info.value.code == 2
    assert "cannot import" in capsys.readouterr().err


def test_stats_unreachable_server_exits_1(capsys):
    from updatebuffer.testing.servers import free_port

    assert main(["stats", f"redis://127.0.0.1:{free_port()}/0?socket_timeout=0.5"]) == 1
    assert "updatebuffer stats:" in capsys.readouterr().err


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
