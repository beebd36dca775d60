"""Redis backend (one node, several nodes through a partition router, or Redis Cluster).

Not built yet: selecting it raises :class:`~updatebuffer.errors.MissingDependencyError` or a
clear error until the Redis backend lands.
"""

from __future__ import annotations

from updatebuffer.errors import MissingDependencyError

try:
    import redis  # noqa: F401  # only checks the driver is installed
except ImportError as exc:
    raise MissingDependencyError("redis", "redis", f"import redis failed: {exc}") from exc

raise MissingDependencyError(
    "redis",
    "redis",
    "the Redis backend is not implemented in this version of updatebuffer yet",
    pip_command="pip install --upgrade updatebuffer",
)
