"""Typed option tables: parse URL query strings and keyword options the same way.

Each backend declares ``OPTIONS: Mapping[str, Option]``. :func:`parse_options` turns the URL
query and the keyword arguments into one dict of typed values, refusing unknown names, malformed
values and an option given twice (URL *and* keyword: neither silently wins).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from updatebuffer.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "Option",
    "boolean",
    "choice",
    "count",
    "duration",
    "mask_url",
    "parse_options",
    "text",
]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Option:
    """One typed option.

    :param parse_text: turns the URL query string into the typed value (raises ``ValueError``).
    :param check: validates a keyword value and returns it normalised (raises ``ValueError``).
    :param default: the value when the option is not given.
    :param expected: description used in error messages.
    """

    parse_text: Callable[[str], Any]
    check: Callable[[Any], Any]
    default: Any
    expected: str


def _number(value: object, kinds: tuple[type, ...]) -> float:
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"expected a number, got {type(value).__qualname__}")
    return float(value)  # type: ignore[arg-type]  # narrowed to int/float above


def duration(default: float, *, minimum: float = 0.0) -> Option:
    """Declare a duration in float seconds (``delay=0.5``), finite and ``>= minimum``."""

    def check(value: object) -> float:
        seconds = _number(value, (int, float))
        if not math.isfinite(seconds) or seconds < minimum:
            raise ValueError(f"must be a finite number of seconds >= {minimum}")
        return seconds

    return Option(lambda s: check(float(s)), check, default, f"seconds (float >= {minimum})")


def count(default: int | None, *, minimum: int = 1) -> Option:
    """Declare a whole count (``batch_size=500``), ``>= minimum``."""

    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an int, got {type(value).__qualname__}")
        if value < minimum:
            raise ValueError(f"must be >= {minimum}")
        return value

    return Option(lambda s: check(int(s, 10)), check, default, f"int >= {minimum}")


def choice(default: str, *choices: str) -> Option:
    """One of a fixed set of strings."""

    def check(value: object) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}")
        return str(value)

    return Option(check, check, default, " | ".join(choices))


def boolean(default: bool) -> Option:
    """Declare a flag: keyword ``bool``, or ``true/false/1/0/yes/no/on/off`` in a URL."""

    def parse(text: str) -> bool:
        lowered = text.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError("must be true or false")

    def check(value: object) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected a bool, got {type(value).__qualname__}")
        return value

    return Option(parse, check, default, "true | false")


def text(default: str | None) -> Option:
    """Declare a free-form non-empty string."""

    def check(value: object) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError("must be a non-empty str")
        return value

    return Option(check, check, default, "non-empty str")


def parse_options(
    backend: str,
    table: Mapping[str, Option],
    url: str,
    options: Mapping[str, Any],
    *,
    passthrough: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge the URL query of *url* and keyword *options* into typed values.

    :param backend: backend name for messages.
    :param table: the backend's option table.
    :param url: the URL whose query string is parsed.
    :param options: keyword options; values are checked, not parsed from strings.
    :param passthrough: keyword-only values that are not in the table but accepted as they are
        (objects such as injected clients); they are returned unchanged.
    :raises ConfigurationError: an unknown option, a malformed value, or an option given both in
        the URL and as a keyword; the message names the option and what is valid.
    """
    passthrough = passthrough or {}
    result = {name: spec.default for name, spec in table.items()}
    known = ", ".join(sorted(table)) or "none"
    from_url: set[str] = set()
    for name, raw in parse_qsl(urlsplit(url).query, keep_blank_values=True, strict_parsing=False):
        spec = table.get(name)
        if spec is None:
            raise ConfigurationError(
                f"unknown option {name!r} in {backend} URL {mask_url(url)}; known options: {known}",
                option=name,
            )
        if name in from_url:
            raise ConfigurationError(
                f"option {name!r} appears twice in {backend} URL {mask_url(url)}", option=name
            )
        try:
            result[name] = spec.parse_text(raw)
        except ValueError as exc:
            raise ConfigurationError(
                f"invalid value for {name!r} in {backend} URL: {raw!r} ({exc}); "
                f"expected {spec.expected}",
                option=name,
            ) from None
        from_url.add(name)
    for name, value in options.items():
        if name in passthrough:
            continue
        spec = table.get(name)
        if spec is None:
            raise ConfigurationError(
                f"unknown option {name!r} for the {backend} backend; known options: {known}",
                option=name,
            )
        if name in from_url:
            raise ConfigurationError(
                f"option {name!r} is given both in the URL and as a keyword; give it once",
                option=name,
            )
        try:
            result[name] = spec.check(value)
        except ValueError as exc:
            raise ConfigurationError(
                f"invalid value for option {name!r}: {value!r} ({exc}); expected {spec.expected}",
                option=name,
            ) from None
    return result


def mask_url(url: str) -> str:
    """Return *url* with any password replaced by ``***`` (for repr, logs and errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    # Split the netloc as urlsplit does, but keep host and port as written: ``parts.port``
    # raises on a malformed port, and a masking helper used in error messages must not.
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    netloc = f"{user}:***@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
