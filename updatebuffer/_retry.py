"""Retry policy shared by backends: backoff between deliveries and batch splitting."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from updatebuffer.update import child_batch_id

if TYPE_CHECKING:
    from collections.abc import Sequence

    from updatebuffer.update import Update

__all__ = ["DeadLetter", "backoff_delay", "split_batch"]

T = TypeVar("T")


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before delivery *attempt* (2, 3, ...): exponential, capped, jittered.

    Full jitter over the upper half keeps flushers that failed together from retrying together,
    while never retrying sooner than half the nominal delay.
    """
    nominal = min(cap, base * 2.0 ** max(0, attempt - 2))
    return nominal * random.uniform(0.5, 1.0)  # jitter, not cryptography


def split_batch(batch_id: str, rows: Sequence[T]) -> list[tuple[str, Sequence[T]]]:
    """Split a batch that exhausted its attempts into two halves with derived, stable ids.

    Halving isolates a poisonous row in ``log2(n)`` rounds while the healthy rows go through.
    The halves' ids carry the parent's (:func:`~updatebuffer.child_batch_id`), so a ledger can
    recognise rows already applied under it.
    """
    middle = (len(rows) + 1) // 2
    return [
        (child_batch_id(batch_id, 0), rows[:middle]),
        (child_batch_id(batch_id, 1), rows[middle:]),
    ]


@dataclass(frozen=True)
class DeadLetter:
    """A row whose flush failed alone ``max_attempts`` times, kept for inspection and replay.

    :param update: the row's merged update, exactly as it was delivered.
    :param batch_id: id of the last (single-row) batch that failed.
    :param attempts: how many deliveries of that batch failed.
    :param error: ``repr`` of the last exception raised by the flush callback.
    :param failed_at: epoch seconds of the last failure.
    """

    update: Update
    batch_id: str
    attempts: int
    error: str
    failed_at: float
