import sqlite3
import subprocess
import sys
import textwrap

import pytest
from cli_helpers import assert_one_line_error, run_cli

import updatebuffer
from updatebuffer import cli
from updatebuffer.cli import GroupsWriter, main

SMALL = ["demo", "--events", "5000", "--rows", "100"]


def test_demo_totals_match(capsys):
    assert main(SMALL) == 0
    out = capsys.readouterr().out
    assert "OK: both tables hold the same totals" in out
    assert "sum(times_seen) = 5,000 in each" in out
    assert "5,000 updates -> " in out
    direct_line = next(line for line in out.splitlines() if line.startswith("direct "))
    assert direct_line.split()[1:4] == ["5,000", "5,000", "5,000"]


def test_demo_without_tqdm_prints_a_text_progress_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` raise ImportError
    assert main([*SMALL, "--events", "300", "--seed", "7"]) == 0
    err = capsys.readouterr().err
    assert "\r  direct: 100% (300/300 events)" in err
    assert "\rbuffered: 100% (300/300 events)" in err


def test_demo_keep_db_leaves_identical_tables(tmp_path, capsys):
    path = tmp_path / "demo.sqlite3"
    argv = [*SMALL, "--keep-db", str(path), "--hot-fraction", "1", "--no-progress"]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""
    conn = sqlite3.connect(path)
    try:
        direct = conn.execute("SELECT * FROM groups_direct ORDER BY id").fetchall()
        buffered = conn.execute("SELECT * FROM groups_buffered ORDER BY id").fetchall()
    finally:
        conn.close()
    assert direct == buffered
    assert len(direct) == 100
    # --hot-fraction 1: every event hit row 1; event i is stamped base + i * 0.001.
    assert direct[0][:2] == (1, 5000)
    assert direct[0][2] > direct[0][3]
    assert all(row[1:] == (0, None, None) for row in direct[1:])


def test_demo_exits_1_when_the_tables_differ(capsys, monkeypatch):
    class LosingWriter(cli.GroupsWriter):
        def __call__(self, batch):
            if len(batch) > 1:  # "forget" the last row of every multi-row batch
                batch = updatebuffer.Batch(list(batch)[:-1], id=batch.id)
            super().__call__(batch)

    monkeypatch.setattr(cli, "GroupsWriter", LosingWriter)
    assert main([*SMALL, "--no-progress"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_keep_db_refuses_an_existing_file(tmp_path, capsys):
    path = tmp_path / "there.sqlite3"
    path.write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        main([*SMALL, "--keep-db", str(path)])
    assert exc.value.code == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ["--events", "0"],
        ["--events", "many"],
        ["--rows", "-1"],
        ["--hot-fraction", "1.5"],
        ["--hot-fraction", "nan"],
        ["--delay", "-1"],
        ["--batch-size", "0"],
        ["--bogus"],
    ],
)
def test_bad_flags_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", *flags])
    assert exc.value.code == 2
    assert "usage: updatebuffer" in capsys.readouterr().err


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.fixture
def groups_db():
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute(
        "CREATE TABLE groups (id INTEGER PRIMARY KEY, times_seen INTEGER NOT NULL, "
        "last_seen REAL, first_seen REAL)"
    )
    conn.executemany("INSERT INTO groups (id, times_seen) VALUES (?, 0)", [(1,), (2,)])
    yield conn
    conn.close()


def _update(row_id, n, seen):
    return updatebuffer.Update(
        "groups",
        {"id": row_id},
        {"times_seen": n},
        greatest={"last_seen": seen},
        least={"first_seen": seen},
    )


def test_groups_writer_merges_into_existing_values(groups_db):
    writer = GroupsWriter(groups_db)
    writer(updatebuffer.Batch([_update(1, 2, 5.0), _update(2, 1, 7.0)], id="a"))
    writer(updatebuffer.Batch([_update(1, 3, 4.0)], id="b"))  # older timestamp arrives late
    rows = groups_db.execute("SELECT * FROM groups ORDER BY id").fetchall()
    assert rows == [(1, 5, 5.0, 4.0), (2, 1, 7.0, 7.0)]
    assert writer.transactions == 2


def test_groups_writer_rolls_back_a_failed_batch(groups_db):
    groups_db.execute(
        "CREATE TRIGGER refuse_2 BEFORE UPDATE ON groups WHEN NEW.id = 2 "
        "BEGIN SELECT RAISE(ABORT, 'row 2 is locked'); END"
    )
    writer = GroupsWriter(groups_db)
    with pytest.raises(sqlite3.IntegrityError, match="row 2 is locked"):
        writer(updatebuffer.Batch([_update(1, 2, 5.0), _update(2, 1, 7.0)], id="a"))
    assert groups_db.execute("SELECT times_seen FROM groups WHERE id = 1").fetchone() == (0,)
    assert not groups_db.in_transaction
    assert writer.transactions == 0


def test_groups_writer_refuses_other_models(groups_db):
    update = updatebuffer.Update("projects", {"id": 1}, {"times_seen": 1})
    with pytest.raises(ValueError, match="'projects'"):
        GroupsWriter(groups_db)(updatebuffer.Batch([update], id="a"))


def test_python_dash_m_help():
    for argv in (["--help"], ["demo", "--help"]):
        proc = subprocess.run(
            [sys.executable, "-m", "updatebuffer", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert "usage: updatebuffer" in proc.stdout
    assert "--hot-fraction" in proc.stdout


PER_PROCESS = [
    ["worker", "direct://", "--flush", "json:dumps"],
    ["worker", "memory://?delay=0", "--flush", "json:dumps"],
    ["stats", "memory://"],
    ["stats", "--json", "direct://"],
    ["dead", "list", "memory://"],
    ["dead", "replay", "direct://"],
    ["dead", "purge", "memory://"],
]


@pytest.mark.parametrize("argv", PER_PROCESS, ids=lambda argv: " ".join(argv))
def test_per_process_backends_are_refused(argv, capsys):
    # memory:// and direct:// opened by the CLI would be a new, empty buffer of the CLI's own
    # process: stats printed zeros and the worker waited forever (or crashed, direct://).
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    scheme = argv[-3 if argv[0] == "worker" else -1].partition(":")[0]
    assert_one_line_error(err, argv[0], f"{scheme}:// keeps its buffer inside the process")


def test_worker_direct_prints_one_line_not_a_traceback():
    status, out, err = run_cli("worker", "direct://", "--flush", "json:dumps")
    assert status == 2
    assert out == ""
    assert_one_line_error(err, "worker", "direct:// keeps its buffer inside the process")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["stats", "nosuch://x"], "no updatebuffer backend named 'nosuch'"),
        (["stats", "no-scheme-at-all"], "has no scheme"),
        (["dead", "list", "memory://?bogus=1"], "memory://"),
        (["stats", "redis://:pw@[::1/0"], "malformed URL"),
        (["stats", "redis://127.0.0.1:99999/0"], "Port out of range"),
        (["dead", "list", "redis+cluster://127.0.0.1:7000/3"], "has only database 0"),
    ],
)
def test_url_mistakes_are_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, argv[0], fragment)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("no_such_module_xyz:flush", "ModuleNotFoundError: No module named 'no_such_module_xyz'"),
        ("json:no_such_function", "AttributeError"),
        ("json", "expected pkg.module:function"),
        ("json:__name__", "is not callable"),
        ("broken_at_import:flush", "RuntimeError: cannot configure the database"),
    ],
)
def test_worker_bad_flush_spec_is_one_line(spec, fragment, tmp_path):
    (tmp_path / "broken_at_import.py").write_text(
        textwrap.dedent(
            """
            raise RuntimeError("cannot configure the database")
            def flush(batch):
                pass
            """
        )
    )
    status, out, err = run_cli("worker", "redis://127.0.0.1:1/0", "--flush", spec, cwd=tmp_path)
    assert status == 2
    assert out == ""
    assert_one_line_error(err, "worker", "--flush", fragment)
