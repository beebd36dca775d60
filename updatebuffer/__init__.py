"""updatebuffer: absorb hot-row write storms.

Buffer ``incr(model, columns, filters, extra)`` updates in memory or Redis, merge every update to
the same row, and hand the merged rows to your flush callback, which writes each row once.

Example::

    import updatebuffer

    def flush(batch: updatebuffer.Batch) -> None:
        for update in batch:
            ...  # one write per row

    buf = updatebuffer.from_url("memory://?delay=1", flush=flush)
    buf.incr("groups", {"times_seen": 1}, {"id": 42})
"""

from __future__ import annotations

import sys

from updatebuffer._retry import DeadLetter
from updatebuffer._types import Number, Value
from updatebuffer.buffer import Buffer, DeadLetterStore
from updatebuffer.errors import (
    BackendError,
    BackendNotFoundError,
    BufferFullError,
    ConfigurationError,
    InvalidUpdateError,
    MissingDependencyError,
    UpdateBufferError,
)
from updatebuffer.flusher import Flusher
from updatebuffer.registry import (
    available_backends,
    available_routers,
    from_config,
    from_url,
    register_backend,
    register_router,
)
from updatebuffer.routing import Crc32Router, KetamaRouter, PartitionRouter
from updatebuffer.update import (
    Batch,
    BufferStats,
    FlushCallback,
    Update,
    batch_lineage,
    child_batch_id,
)

if sys.version_info >= (3, 12):  # pragma: no cover - depends on the interpreter
    from importlib.metadata import PackageNotFoundError, version
else:  # pragma: no cover - depends on the interpreter
    from importlib_metadata import PackageNotFoundError, version

try:
    __version__ = version("updatebuffer")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = [
    "BackendError",
    "BackendNotFoundError",
    "Batch",
    "Buffer",
    "BufferFullError",
    "BufferStats",
    "ConfigurationError",
    "Crc32Router",
    "DeadLetter",
    "DeadLetterStore",
    "FlushCallback",
    "Flusher",
    "InvalidUpdateError",
    "KetamaRouter",
    "MissingDependencyError",
    "Number",
    "PartitionRouter",
    "Update",
    "UpdateBufferError",
    "Value",
    "__version__",
    "available_backends",
    "available_routers",
    "batch_lineage",
    "child_batch_id",
    "from_config",
    "from_url",
    "register_backend",
    "register_router",
]
