"""Errors raised by the SQLAlchemy flush."""

from __future__ import annotations

from updatebuffer import InvalidUpdateError

__all__ = ["UnwritableUpdateError"]


class UnwritableUpdateError(InvalidUpdateError):
    """An update in a batch cannot be written to the mapped tables; nothing was written.

    Raised by :class:`~updatebuffer_sqlalchemy.SQLAlchemyFlush` before it opens a transaction,
    when an update names a model that is not in ``tables``, a column its table does not have, the
    same column twice, or (with ``upsert=True``) filters that no primary key or unique constraint
    covers.

    It is an :class:`updatebuffer.InvalidUpdateError` (and so a :class:`ValueError`) rather than a
    ``ConfigurationError`` because the fault is in the *data* of particular rows, not in how the
    buffer was set up: the buffer redelivers the batch, splits it after ``max_attempts`` and
    dead-letters exactly the offending rows, while every healthy row of the batch gets written.
    A bad ``tables`` mapping, by contrast, is reported at construction as
    :class:`updatebuffer.ConfigurationError`.

    :param message: what is wrong and what is valid.
    :param model: the update's model.
    :param field: the offending field, e.g. ``"columns['times_seen']"``, or ``"model"``.
    :param expected: what would have been accepted.
    :param got: what was given.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str,
        field: str | None = None,
        expected: str | None = None,
        got: str | None = None,
    ) -> None:
        super().__init__(message, field=field, expected=expected, got=got)
        self.model = model
