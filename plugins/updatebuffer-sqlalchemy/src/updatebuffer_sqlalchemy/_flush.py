"""``SQLAlchemyFlush``: a flush callback that writes each batch in one transaction."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeAlias

import sqlalchemy as sa
from updatebuffer import ConfigurationError, Update

from updatebuffer_sqlalchemy._ledger import DEFAULT_LEDGER_TABLE, claim, ledger_table
from updatebuffer_sqlalchemy._schema import Checker, resolve_tables, writes
from updatebuffer_sqlalchemy._writers import writer_for

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from updatebuffer import Batch

    from updatebuffer_sqlalchemy._schema import Model, Signature

__all__ = ["OnFlushed", "SQLAlchemyFlush"]

log = logging.getLogger("updatebuffer_sqlalchemy")

#: ``on_flushed(updates, created)``: every update of a committed batch (in batch order, signal-only
#: ones included) and, aligned with it, whether that row was inserted by an upsert.
OnFlushed: TypeAlias = Callable[[Sequence[Update], Sequence[bool]], object]


class SQLAlchemyFlush:
    """A flush callback that writes an updatebuffer batch into SQL tables in one transaction.

    Per row: ``columns`` become ``col = COALESCE(col, 0) + delta``, ``extra`` become
    ``col = value``, ``greatest``/``least`` keep the max/min with NULL counting as absent, and a
    ``signal_only`` row writes nothing (it still reaches *on_flushed*). Rows are sorted by their
    filters so concurrent flushers lock rows in one order. PostgreSQL gets one
    ``UPDATE ... FROM unnest(...)`` statement per model and row shape; SQLite gets ``executemany``;
    any other dialect gets generic SQLAlchemy statements.

    With *ledger* on, the batch id is inserted into the ledger table first, in the same
    transaction: a batch delivered again after its transaction committed (a worker killed before
    it acknowledged) is skipped, which makes the buffer's at-least-once delivery effectively-once.

    Example configuration::

        import sqlalchemy as sa
        import updatebuffer
        from updatebuffer_sqlalchemy import SQLAlchemyFlush, create_ledger

        engine = sa.create_engine("postgresql+psycopg://app@db/app")
        create_ledger(engine)
        flush = SQLAlchemyFlush(engine, tables={"groups": groups_table}, upsert=True)
        buf = updatebuffer.from_url("redis://127.0.0.1:6379/0", flush=flush)

    :param engine: the database to write to.
    :param tables: model name (as passed to ``incr``) to a :class:`~sqlalchemy.Table` or a mapped
        ORM class. With an ORM class, field names are its attribute keys.
    :param upsert: create missing rows (``INSERT ... ON CONFLICT (filters) DO UPDATE`` on
        PostgreSQL and SQLite, UPDATE-then-INSERT elsewhere). The filters of each update must be
        exactly a primary key or unique constraint of the table. Without upsert, an update of a
        missing row writes nothing (logged as a warning).
    :param ledger: record batch ids in the ledger table and skip batches already recorded.
    :param ledger_table: the ledger table name (create it with :func:`create_ledger`).
    :param on_flushed: called after each commit with ``(updates, created)``; see
        :data:`OnFlushed`. Not called for a batch skipped by the ledger. An exception it raises is
        logged and not re-raised: the batch is committed, and a redelivery must not write it
        again.
    :raises ConfigurationError: *engine* is not an :class:`~sqlalchemy.engine.Engine`, *tables*
        is empty or maps a name to something that is not a table, *ledger_table* is empty, or
        *on_flushed* is not callable.
    """

    def __init__(
        self,
        engine: Engine,
        tables: Mapping[str, object],
        *,
        upsert: bool = False,
        ledger: bool = True,
        ledger_table: str = DEFAULT_LEDGER_TABLE,
        on_flushed: OnFlushed | None = None,
    ) -> None:
        if not isinstance(engine, sa.Engine):
            raise ConfigurationError(
                f"engine must be a sqlalchemy Engine (sqlalchemy.create_engine(url)), got "
                f"{type(engine).__qualname__}",
                option="engine",
            )
        if not _is_name(ledger_table):
            raise ConfigurationError(
                f"ledger_table must be a non-empty table name, got {ledger_table!r}",
                option="ledger_table",
            )
        if on_flushed is not None and not callable(on_flushed):
            raise ConfigurationError(
                f"on_flushed must be callable or None, got {type(on_flushed).__qualname__}",
                option="on_flushed",
            )
        self.engine = engine
        self.models: Mapping[str, Model] = resolve_tables(tables)
        self.upsert = bool(upsert)
        self.ledger: sa.Table | None = (
            _ledger(ledger_table) if ledger else None  # a private MetaData: never the host's
        )
        self.on_flushed = on_flushed
        self._writer = writer_for(engine.dialect)
        self._check = Checker(self.models, upsert=self.upsert)

    def __repr__(self) -> str:
        ledger = self.ledger.name if self.ledger is not None else None
        return (
            f"SQLAlchemyFlush({self.engine.dialect.name}, models={sorted(self.models)!r}, "
            f"upsert={self.upsert}, ledger={ledger!r})"
        )

    def __call__(self, batch: Batch) -> None:
        """Write *batch* in one transaction, or skip it if its id is already in the ledger.

        :raises UnwritableUpdateError: an update names an unknown model or column (raised before
            anything is written).
        :raises sqlalchemy.exc.SQLAlchemyError: the database failed; the transaction was rolled
            back, and the buffer will deliver the batch again.
        """
        # Check every row before opening the transaction: a bad row must not leave a half-written
        # batch, nor cost a round trip.
        per_model: dict[str, dict[Signature, list[Update]]] = {}
        check = self._check
        upsert = self.upsert
        for update in batch:
            model, sig = check(update)
            if writes(update, upsert=upsert):
                per_model.setdefault(model.name, {}).setdefault(sig, []).append(update)
        created: dict[int, bool] = {}
        if per_model or self.ledger is not None:
            with self.engine.connect() as conn, conn.begin() as transaction:
                if self.ledger is not None and not claim(conn, self.ledger, batch.id):
                    transaction.rollback()  # nothing to keep; never commit on this path
                    log.info(
                        "batch %s (attempt %d) was already applied; skipping it",
                        batch.id,
                        batch.attempt,
                    )
                    return
                for name in sorted(per_model):  # models in one order, like rows
                    model = self.models[name]
                    groups = per_model[name]
                    if upsert:
                        created.update(self._writer.upsert(conn, model, groups))
                    else:
                        missing = self._writer.update(conn, model, groups)
                        if missing:
                            log.warning(
                                "batch %s: %d of %d %r rows matched no row and were not written "
                                "(use upsert=True to create them)",
                                batch.id,
                                missing,
                                sum(map(len, groups.values())),
                                name,
                            )
        if self.on_flushed is not None:
            updates = list(batch)
            try:
                self.on_flushed(updates, [created.get(id(u), False) for u in updates])
            except Exception:
                # Committed already: raising would make the buffer redeliver the batch.
                log.exception("on_flushed failed for committed batch %s", batch.id)


def _is_name(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _ledger(name: str) -> sa.Table:
    return ledger_table(sa.MetaData(), name)
