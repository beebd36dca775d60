"""Name-based discovery of backends and routers through entry points.

The core declares its own built-ins as entry points (keyring's approach), so built-ins and
third-party backends load the same way. Only the selected entry point is imported; listing names
imports nothing (fsspec). A broken plugin that nobody selects breaks nothing.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from updatebuffer.config import mask_url
from updatebuffer.errors import BackendNotFoundError, ConfigurationError, MissingDependencyError

if sys.version_info >= (3, 12):  # pragma: no cover - depends on the interpreter
    from importlib.metadata import EntryPoint, entry_points
else:  # pragma: no cover - depends on the interpreter
    from importlib_metadata import EntryPoint, entry_points

if TYPE_CHECKING:
    from updatebuffer.buffer import Buffer
    from updatebuffer.routing import PartitionRouter
    from updatebuffer.update import FlushCallback

__all__ = [
    "BACKENDS_GROUP",
    "ROUTERS_GROUP",
    "available_backends",
    "available_routers",
    "from_config",
    "from_url",
    "load_backend",
    "load_router",
    "make_router",
    "register_backend",
    "register_router",
]

#: Entry-point group of buffer backends; each entry point names a class with ``from_url``.
BACKENDS_GROUP = "updatebuffer.backends"
#: Entry-point group of partition routers; each names a class taking the node count or ids.
ROUTERS_GROUP = "updatebuffer.routers"

# URL scheme heads that are spellings of another backend's name (TLS variants).
_SCHEME_ALIASES = {"rediss": "redis"}

Target = type | str

_lock = threading.Lock()
_registered: dict[str, dict[str, Target]] = {BACKENDS_GROUP: {}, ROUTERS_GROUP: {}}
_loaded: dict[tuple[str, str], type] = {}


def _target_path(target: Target) -> str:
    if isinstance(target, str):
        return target
    return f"{target.__module__}:{target.__qualname__}"


def _dist_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return str(dist.name) if dist is not None else "<unknown distribution>"


def _entry_points(group: str) -> dict[str, list[EntryPoint]]:
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=group):
        claims = found.setdefault(ep.name, [])
        # The same distribution seen through two sys.path entries is one claim, not a conflict.
        if not any(c.value == ep.value and _dist_name(c) == _dist_name(ep) for c in claims):
            claims.append(ep)
    return found


def _available(group: str) -> list[str]:
    with _lock:
        registered = set(_registered[group])
    return sorted(registered | set(_entry_points(group)))


def available_backends() -> list[str]:
    """Return the names of installed and registered backends, sorted, importing none of them.

    A listed backend may still raise :class:`MissingDependencyError` when selected.
    """
    return _available(BACKENDS_GROUP)


def available_routers() -> list[str]:
    """Return the names of installed and registered partition routers, importing none."""
    return _available(ROUTERS_GROUP)


def _register(group: str, kind: str, name: object, target: object, replace: bool) -> None:
    if not isinstance(name, str) or not name or "+" in name or ":" in name:
        raise ConfigurationError(f"{kind} name must be a non-empty str without '+' or ':'")
    if not isinstance(target, (str, type)):
        raise ConfigurationError(f"{kind} target must be a class or a 'module:Class' string")
    path = _target_path(target)
    with _lock:
        taken = _registered[group].get(name)
        existing = [_target_path(taken)] if taken is not None else []
        if taken is None:
            existing = [ep.value for ep in _entry_points(group).get(name, [])]
        if existing and not replace and any(e != path for e in existing):
            raise ConfigurationError(
                f"{kind} name {name!r} is already taken by {existing[0]}; "
                f"pass replace=True to override it with {path}"
            )
        _registered[group][name] = target
        _loaded.pop((group, name), None)


def register_backend(name: str, target: type | str, *, replace: bool = False) -> None:
    """Register a backend class under *name* for :func:`from_url` and :func:`from_config`.

    :param name: the name (and URL scheme head) to register.
    :param target: the class, or a ``"module:Class"`` string imported on first use.
    :param replace: allow replacing a different target already registered or installed
        under *name*.
    :raises ConfigurationError: *name* is taken by a different target and *replace* is false.
    """
    _register(BACKENDS_GROUP, "backend", name, target, replace)


def register_router(name: str, target: type | str, *, replace: bool = False) -> None:
    """Register a partition router class under *name* (see :func:`register_backend`).

    :raises ConfigurationError: *name* is taken by a different target and *replace* is false.
    """
    _register(ROUTERS_GROUP, "router", name, target, replace)


def _import_path(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    module = __import__(module_name, fromlist=["_"])
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _load(group: str, kind: str, name: str) -> type:
    with _lock:
        cached = _loaded.get((group, name))
        registered = _registered[group].get(name)
    if cached is not None:
        return cached
    if registered is not None:
        target = registered
    else:
        claims = _entry_points(group).get(name)
        if not claims:
            raise BackendNotFoundError(name, _available(group), kind=kind)
        if len(claims) > 1:
            owners = " and ".join(f"{_dist_name(ep)} ({ep.value})" for ep in claims)
            raise ConfigurationError(
                f"{kind} name {name!r} is claimed by more than one distribution: {owners}; "
                f"uninstall one of them or call register_{kind}({name!r}, ..., replace=True)"
            )
        target = claims[0].value
    try:
        loaded = _import_path(target) if isinstance(target, str) else target
    except MissingDependencyError:
        raise
    except ImportError as exc:
        dist = "" if isinstance(target, type) else target.partition(":")[0].split(".")[0]
        raise MissingDependencyError(
            name,
            name,
            f"importing {target} failed: {exc}",
            pip_command=None if dist == "updatebuffer" else f"pip install {exc.name or dist}",
        ) from exc
    if not isinstance(loaded, type):
        raise ConfigurationError(f"{kind} {name!r} points at {target}, which is not a class")
    with _lock:
        _loaded[(group, name)] = loaded
    return loaded


def load_backend(name: str) -> type:
    """Import and return the backend class registered or installed under *name*.

    :raises BackendNotFoundError: no backend has that name (lists the installed ones).
    :raises MissingDependencyError: the backend's optional dependency is missing.
    :raises ConfigurationError: two distributions claim the name.
    """
    return _load(BACKENDS_GROUP, "backend", name)


def load_router(name: str) -> type:
    """Import and return the router class registered or installed under *name*.

    :raises BackendNotFoundError: no router has that name.
    """
    return _load(ROUTERS_GROUP, "router", name)


def make_router(router: str | PartitionRouter, n_nodes: int) -> PartitionRouter:
    """Return a router for *n_nodes* nodes: build one by name, or check a given instance.

    :raises ConfigurationError: the instance routes to a different number of nodes.
    """
    if isinstance(router, str):
        built: PartitionRouter = load_router(router)(n_nodes)
        return built
    nodes = getattr(router, "n_nodes", None)
    if nodes is not None and nodes != n_nodes:
        raise ConfigurationError(
            f"router {router!r} routes to {nodes} nodes, but {n_nodes} are configured"
        )
    return router


def backend_name_for_url(url: str) -> str:
    """Return the backend name a URL selects: its scheme up to the first ``+``.

    :raises ConfigurationError: the URL has no scheme.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"URL must be a str, got {type(url).__qualname__}")
    try:
        scheme = urlsplit(url).scheme if "://" in url else ""
    except ValueError as exc:  # e.g. an unclosed "[" of an IPv6 host
        raise ConfigurationError(f"malformed URL {mask_url(url)}: {exc}") from None
    if not scheme:
        raise ConfigurationError(
            f"URL {mask_url(url)!r} has no scheme; use e.g. 'memory://' or 'redis://host:6379/0'"
        )
    head = scheme.split("+", 1)[0].lower()
    return _SCHEME_ALIASES.get(head, head)


def from_url(url: str, *, flush: FlushCallback, **options: Any) -> Buffer:
    """Build the buffer a URL describes.

    The scheme up to the first ``+`` names the backend (``memory://``, ``redis://``,
    ``redis+cluster://``); the query string and *options* are its typed options.

    :param url: the backend URL.
    :param flush: the host's flush callback.
    :param options: backend options; giving one both here and in the URL is an error.
    :raises BackendNotFoundError: no backend has that name.
    :raises MissingDependencyError: the backend needs an extra that is not installed.
    :raises ConfigurationError: an option is unknown or malformed.
    """
    if not callable(flush):
        raise ConfigurationError(f"flush must be callable, got {type(flush).__qualname__}")
    cls = load_backend(backend_name_for_url(url))
    buffer: Buffer = cls.from_url(url, flush=flush, **options)  # type: ignore[attr-defined]  # backend contract: classmethod from_url
    return buffer


_CONFIG_KEYS = {"backend", "url", "options"}


def from_config(config: Mapping[str, Any], *, flush: FlushCallback) -> Buffer:
    """Build a buffer from a settings mapping, Sentry's ``SENTRY_BUFFER_OPTIONS`` shape.

    ``{"backend": "redis", "options": {"hosts": {0: {...}}, "delay": 5}}``; an optional ``"url"``
    is passed to the backend with the options (default ``"<backend>://"``).

    :raises ConfigurationError: the mapping has unknown keys or lacks ``"backend"``.
    """
    if not isinstance(config, Mapping):
        raise ConfigurationError(f"config must be a mapping, got {type(config).__qualname__}")
    unknown = set(config) - _CONFIG_KEYS
    if unknown:
        raise ConfigurationError(
            f"unknown config keys {sorted(map(str, unknown))}; expected {sorted(_CONFIG_KEYS)}"
        )
    name = config.get("backend")
    if not isinstance(name, str) or not name:
        raise ConfigurationError("config needs 'backend': the name of an installed backend")
    options = config.get("options") or {}
    if not isinstance(options, Mapping):
        raise ConfigurationError("config 'options' must be a mapping of option name to value")
    url = config.get("url") or f"{name}://"
    if backend_name_for_url(url) != name:
        raise ConfigurationError(f"config 'url' selects another backend than {name!r}")
    return from_url(url, flush=flush, **dict(options))
