"""The applied-batches ledger that makes a redelivered batch a no-op."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from updatebuffer import batch_lineage

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

__all__ = ["DEFAULT_LEDGER_TABLE", "create_ledger", "ledger_table", "prune_ledger"]

DEFAULT_LEDGER_TABLE = "updatebuffer_applied_batches"
"""Default name of the ledger table."""

# Batch ids are a uuid hex plus ".0"/".1" per split (and "/split" for markers); 255 leaves room
# and stays indexable on MySQL.
_BATCH_ID_LENGTH = 255


def ledger_table(metadata: sa.MetaData | None = None, name: str = DEFAULT_LEDGER_TABLE) -> sa.Table:
    """Return the ledger :class:`~sqlalchemy.Table`: ``(batch_id primary key, applied_at)``.

    Each applied batch records its id and ``<id>/split``, a marker that batches split from it
    record too (see :class:`~updatebuffer_sqlalchemy.SQLAlchemyFlush`).

    Add it to your own ``MetaData`` to have Alembic (or ``metadata.create_all``) manage it.

    :param metadata: the metadata to define it in (a new one by default).
    :param name: the table name.
    """
    return sa.Table(
        name,
        metadata if metadata is not None else sa.MetaData(),
        sa.Column("batch_id", sa.String(_BATCH_ID_LENGTH), primary_key=True),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
    )


def create_ledger(engine: Engine, name: str = DEFAULT_LEDGER_TABLE) -> sa.Table:
    """Create the ledger table if it does not exist yet and return it.

    :param engine: the database to create it in.
    :param name: the table name; pass the same ``ledger_table`` to :class:`SQLAlchemyFlush`.
    """
    table = ledger_table(name=name)
    table.create(engine, checkfirst=True)
    return table


def prune_ledger(
    engine: Engine, older_than: datetime.timedelta, name: str = DEFAULT_LEDGER_TABLE
) -> int:
    """Delete ledger entries older than *older_than*; return how many batches were deleted.

    A batch id only needs remembering while the batch can still be redelivered: keep entries for
    well over the buffer's longest retry window (``max_attempts`` backoffs, lease expiry).

    :param engine: the database.
    :param older_than: the age past which entries are deleted.
    :param name: the ledger table name.
    """
    table = ledger_table(name=name)
    cutoff = datetime.datetime.now(datetime.timezone.utc) - older_than
    old = table.c.applied_at < cutoff
    marker = table.c.batch_id.endswith(_SPLIT_MARK, autoescape=True)
    with engine.begin() as conn:
        conn.execute(sa.delete(table).where(old, marker))
        return int(conn.execute(sa.delete(table).where(old, ~marker)).rowcount)


# A batch's split marker: recorded with the batch's id, and by every batch split from it. A
# batch whose marker is recorded by someone else was split and (partly) applied under its
# halves' ids, so it must not be applied whole (a worker that outlived its lease).
_SPLIT_MARK = "/split"


def claim(conn: Connection, table: sa.Table, batch_id: str) -> bool:
    """Record *batch_id* in the ledger in the open transaction; return false if it was applied.

    A batch counts as applied when its own id is recorded, or the id of a batch it was split
    from (:func:`updatebuffer.batch_lineage`): a batch that committed but was reported as failed
    (an error after the commit, a lost COMMIT reply) may be split later, and its halves carry
    rows already applied under the parent's id. The other way round, a split half records its
    ancestors' split markers, so a worker that still holds the whole parent (its lease expired)
    skips it instead of applying rows its halves applied.

    The inserts go first in the transaction: a second worker holding the same batch (a lease that
    expired under a slow flush), or a half and its parent at the same time, block on the
    uncommitted key until the first one commits, and then see it and skip -- or proceed if the
    first one rolled back.
    """
    lineage = batch_lineage(batch_id)
    if not _insert(conn, table, (batch_id, batch_id + _SPLIT_MARK), exclusive=True):
        return False
    if len(lineage) == 1:
        return True
    # Only split batches pay for these statements; on a skip the caller rolls back.
    _insert(conn, table, tuple(a + _SPLIT_MARK for a in lineage[1:]), exclusive=False)
    seen = conn.execute(
        sa.select(table.c.batch_id).where(table.c.batch_id.in_(lineage[1:])).limit(1)
    ).first()
    return seen is None


def _insert(conn: Connection, table: sa.Table, keys: tuple[str, ...], *, exclusive: bool) -> bool:
    """Insert the ledger *keys*; return false if *exclusive* and any of them was recorded.

    With *exclusive* false, keys already recorded are left as they are.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    rows = [{"batch_id": key, "applied_at": now} for key in keys]
    dialect = conn.dialect.name
    if dialect in ("postgresql", "sqlite"):
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = insert(table).values(rows).on_conflict_do_nothing()
        # SQLAlchemy only promises rowcount for UPDATE/DELETE unless asked to keep it.
        result = conn.execution_options(preserve_rowcount=True).execute(stmt)
        return not exclusive or result.rowcount == len(rows)
    seen = set(
        conn.execute(sa.select(table.c.batch_id).where(table.c.batch_id.in_(keys))).scalars()
    )
    if exclusive and seen:
        return False
    new = [row for row in rows if row["batch_id"] not in seen]
    if new:
        # A concurrent duplicate makes this insert fail with IntegrityError: the transaction
        # rolls back, the buffer redelivers, and the next attempt sees the id and skips.
        conn.execute(sa.insert(table), new)
    return True
