"""The updatebuffer error hierarchy.

Every error the library raises on purpose derives from :class:`UpdateBufferError`. Errors that
describe a wrong value also derive from :class:`ValueError`, so code that already catches
``ValueError`` keeps working (keyring's ``NoKeyringError(KeyringError, RuntimeError)`` pattern).
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendNotFoundError",
    "BufferFullError",
    "ConfigurationError",
    "InvalidUpdateError",
    "MissingDependencyError",
    "UpdateBufferError",
]


class UpdateBufferError(Exception):
    """Root of every error raised by updatebuffer."""


class ConfigurationError(UpdateBufferError, ValueError):
    """A URL, option or configuration mapping is invalid.

    :param message: what is wrong, what is valid, and what to do.
    :param option: the option name at fault, when there is one.
    """

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class BackendNotFoundError(ConfigurationError):
    """No backend (or router) is installed under the requested name.

    :param name: the requested name.
    :param available: the names that are installed.
    """

    def __init__(self, name: str, available: list[str], *, kind: str = "backend") -> None:
        listed = ", ".join(repr(n) for n in available) or "none"
        super().__init__(
            f"no updatebuffer {kind} named {name!r} is installed; installed: {listed}. "
            f"Install a distribution that provides it or call register_{kind}()."
        )
        self.name = name
        self.available = available


class MissingDependencyError(ConfigurationError, ImportError):
    """The selected backend needs an optional dependency that is not installed.

    :param backend: the backend (or feature) that needs it.
    :param extra: the updatebuffer extra that installs it.
    :param detail: what failed to import.
    :param pip_command: the install command, when it is not ``pip install 'updatebuffer[extra]'``.
    """

    def __init__(
        self, backend: str, extra: str, detail: str = "", *, pip_command: str | None = None
    ) -> None:
        self.pip_command = pip_command or f"pip install 'updatebuffer[{extra}]'"
        message = f"the {backend!r} backend needs extra dependencies: {self.pip_command}"
        if detail:
            message = f"{message} ({detail})"
        ConfigurationError.__init__(self, message)
        self.backend = backend
        self.extra = extra


class InvalidUpdateError(UpdateBufferError, ValueError):
    """An ``incr`` call carries a value the buffer cannot store faithfully.

    Raised at ``incr`` time, before anything is stored.

    :param message: the explanation.
    :param field: the offending field, e.g. ``"filters['id']"`` or ``"columns['times_seen']"``.
    :param expected: what would have been accepted.
    :param got: the type name (or value) that was given.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        expected: str | None = None,
        got: str | None = None,
    ) -> None:
        super().__init__(message)
        self.field = field
        self.expected = expected
        self.got = got


class BackendError(UpdateBufferError, RuntimeError):
    """The storage behind a backend failed (connection refused, timeout, script error).

    The driver's own exception is chained as ``__cause__``, so hosts never import the driver to
    catch it.
    """


class BufferFullError(BackendError):
    """A bounded buffer is full and its overflow policy is ``"raise"`` (or ``"block"`` timed out).

    Nothing of the rejected update was stored.
    """
