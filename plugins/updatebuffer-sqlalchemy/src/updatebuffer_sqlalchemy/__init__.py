"""updatebuffer-sqlalchemy: write updatebuffer batches into any SQL database, effectively once.

Example::

    import sqlalchemy as sa
    import updatebuffer
    from updatebuffer_sqlalchemy import SQLAlchemyFlush, create_ledger

    engine = sa.create_engine("sqlite:///app.db")
    create_ledger(engine)
    flush = SQLAlchemyFlush(engine, tables={"groups": groups_table})
    with updatebuffer.from_url("memory://?delay=1", flush=flush) as buf:
        buf.incr("groups", {"times_seen": 1}, {"id": 42})
"""

from __future__ import annotations

import sys

from updatebuffer_sqlalchemy._errors import UnwritableUpdateError
from updatebuffer_sqlalchemy._flush import OnFlushed, SQLAlchemyFlush
from updatebuffer_sqlalchemy._ledger import (
    DEFAULT_LEDGER_TABLE,
    create_ledger,
    ledger_table,
    prune_ledger,
)

if sys.version_info >= (3, 12):  # pragma: no cover - depends on the interpreter
    from importlib.metadata import PackageNotFoundError, version
else:  # pragma: no cover - depends on the interpreter
    from importlib_metadata import PackageNotFoundError, version

try:
    __version__ = version("updatebuffer-sqlalchemy")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_LEDGER_TABLE",
    "OnFlushed",
    "SQLAlchemyFlush",
    "UnwritableUpdateError",
    "__version__",
    "create_ledger",
    "ledger_table",
    "prune_ledger",
]
