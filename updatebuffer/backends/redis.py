"""Redis backend (one node, several nodes through a partition router, or Redis Cluster).

Not available in this version: importing this module raises
:class:`~updatebuffer.errors.MissingDependencyError`, so selecting ``redis://`` fails with a clear
message while ``available_backends()`` already lists the name.
"""

from __future__ import annotations

import importlib.util

from updatebuffer.errors import MissingDependencyError

if importlib.util.find_spec("redis") is None:
    raise MissingDependencyError("redis", "redis", "the 'redis' package is not installed")

raise MissingDependencyError(
    "redis",
    "redis",
    "the Redis backend is not implemented in this version of updatebuffer yet",
    pip_command="pip install --upgrade updatebuffer",
)
