from __future__ import annotations

import pytest

import updatebuffer
from updatebuffer.backends.memory import MemoryBuffer
from updatebuffer.config import (
    boolean,
    choice,
    count,
    duration,
    mask_url,
    parse_options,
    text,
)
from updatebuffer.errors import ConfigurationError


def noop_flush(batch):
    pass


def memory(url="memory://", **options):
    return updatebuffer.from_url(url, flush=noop_flush, **options)


# -- typed parsing -----------------------------------------------------------------------------


def test_url_options_become_typed_attributes():
    buf = memory("memory://?delay=0.5&batch_size=10")
    assert type(buf) is MemoryBuffer
    assert buf.delay == 0.5
    assert type(buf.delay) is float
    assert buf.batch_size == 10
    assert type(buf.batch_size) is int


def test_whole_seconds_are_still_floats():
    assert type(memory("memory://?delay=2").delay) is float
    assert type(memory(delay=2).delay) is float
    assert memory(delay=2).delay == 2.0


def test_every_memory_option_from_the_url():
    buf = memory(
        "memory://?delay=1.5&batch_size=3&max_rows=7&overflow=raise&block_timeout=0.25"
        "&max_attempts=2&retry_backoff=0.1&retry_backoff_max=4&drain_on_close=false"
    )
    assert (buf.delay, buf.batch_size, buf.max_rows, buf.overflow) == (1.5, 3, 7, "raise")
    assert (buf.block_timeout, buf.max_attempts) == (0.25, 2)
    assert (buf.retry_backoff, buf.retry_backoff_max) == (0.1, 4.0)
    assert buf.drain_on_close is False


def test_keywords_are_checked_not_parsed():
    buf = memory(delay=0.5, batch_size=10, overflow="block", drain_on_close=False)
    assert (buf.delay, buf.batch_size, buf.overflow, buf.drain_on_close) == (
        0.5,
        10,
        "block",
        False,
    )


def test_defaults():
    buf = memory()
    assert (buf.delay, buf.batch_size, buf.max_attempts) == (0.0, 500, 5)


def assert_names(err, option):
    assert isinstance(err, ConfigurationError)
    assert isinstance(err, ValueError)
    assert err.option == option
    assert repr(option) in str(err)


@pytest.mark.parametrize(
    ("url", "option"),
    [
        ("memory://?bogus=1", "bogus"),
        ("memory://?Delay=1", "Delay"),
        ("memory://?delay=abc", "delay"),
        ("memory://?delay=", "delay"),
        ("memory://?delay=-1", "delay"),
        ("memory://?delay=nan", "delay"),
        ("memory://?delay=inf", "delay"),
        ("memory://?batch_size=1.5", "batch_size"),
        ("memory://?batch_size=0", "batch_size"),
        ("memory://?batch_size=-3", "batch_size"),
        ("memory://?batch_size=ten", "batch_size"),
        ("memory://?batch_size=", "batch_size"),
        ("memory://?overflow=drop", "overflow"),
        ("memory://?drain_on_close=maybe", "drain_on_close"),
        ("memory://?delay=1&delay=1", "delay"),
        ("memory://?delay=1&batch_size=5&delay=2", "delay"),
        ("direct://?delay=1", "delay"),
    ],
)
def test_bad_url_options_are_configuration_errors(url, option):
    with pytest.raises(ConfigurationError) as info:
        memory(url)
    assert_names(info.value, option)


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"bogus": 1}, "bogus"),
        ({"batch_size": True}, "batch_size"),
        ({"batch_size": False}, "batch_size"),
        ({"max_rows": True}, "max_rows"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"batch_size": 10.0}, "batch_size"),
        ({"batch_size": "10"}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": None}, "batch_size"),
        ({"delay": True}, "delay"),
        ({"delay": "0.5"}, "delay"),
        ({"delay": -0.5}, "delay"),
        ({"delay": float("nan")}, "delay"),
        ({"delay": float("inf")}, "delay"),
        ({"overflow": "drop"}, "overflow"),
        ({"overflow": None}, "overflow"),
        ({"drain_on_close": 1}, "drain_on_close"),
        ({"drain_on_close": "false"}, "drain_on_close"),
    ],
)
def test_bad_keyword_options_are_configuration_errors(options, option):
    with pytest.raises(ConfigurationError) as info:
        memory(**options)
    assert_names(info.value, option)


@pytest.mark.parametrize("options", [{"batch_size": True}, {"delay": "1"}, {"overflow": "x"}])
def test_constructor_checks_options_too(options):
    with pytest.raises(ConfigurationError) as info:
        MemoryBuffer(flush=noop_flush, **options)
    assert_names(info.value, next(iter(options)))


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("memory://?delay=0.5", {"delay": 0.5}),
        ("memory://?delay=0.5", {"delay": 1}),
        ("memory://?batch_size=10&delay=1", {"batch_size": 10}),
    ],
)
def test_same_option_in_url_and_keyword_is_an_error(url, options):
    with pytest.raises(ConfigurationError, match="once") as info:
        memory(url, **options)
    assert_names(info.value, next(iter(options)))


def test_error_says_what_is_valid():
    with pytest.raises(ConfigurationError) as info:
        memory("memory://?bogus=1")
    assert "batch_size" in str(info.value)
    assert "delay" in str(info.value)
    with pytest.raises(ConfigurationError, match=r"int >= 1"):
        memory("memory://?batch_size=0")
    with pytest.raises(ConfigurationError, match=r"flush \| block \| raise"):
        memory(overflow="drop")


def test_parse_options_table_helpers():
    table = {
        "wait": duration(1.0, minimum=0.5),
        "n": count(None, minimum=0),
        "mode": choice("a", "a", "b"),
        "on": boolean(False),
        "name": text(None),
    }
    assert parse_options("x", table, "x://", {}) == {
        "wait": 1.0,
        "n": None,
        "mode": "a",
        "on": False,
        "name": None,
    }
    parsed = parse_options("x", table, "x://?wait=0.5&n=0&mode=b&on=YES&name=n1", {})
    assert parsed == {"wait": 0.5, "n": 0, "mode": "b", "on": True, "name": "n1"}
    assert parse_options("x", table, "x://", {"client": object()}, passthrough={"client": None})
    for url, option in [("x://?wait=0.4", "wait"), ("x://?name=", "name"), ("x://?on=2", "on")]:
        with pytest.raises(ConfigurationError) as info:
            parse_options("x", table, url, {})
        assert info.value.option == option


# -- secrets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://user:secret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:secret@host/0?db=1#frag", "redis://:***@host/0?db=1#frag"),
        ("rediss://user:secret@[::1]:6380/2", "rediss://user:***@[::1]:6380/2"),
        ("redis://user:p@ss:w0rd@Host.Example:6379", "redis://user:***@Host.Example:6379"),
        # A malformed port must not turn masking into an exception (it runs inside errors).
        ("redis://user:secret@host:port/0", "redis://user:***@host:port/0"),
        ("redis://user@host:6379/0", "redis://user@host:6379/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("memory://", "memory://"),
        ("memory://?delay=1", "memory://?delay=1"),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked


def test_mask_url_never_raises():
    assert "secret" not in mask_url("redis://user:secret@[::1/0")


SECRET_URLS = [
    ("redis://user:secret@host:6379/0?bogus=1", "redis"),
    ("redis://user:secret@host:6379/0?delay=abc", "redis"),
    ("redis://user:secret@host:6379/0?delay=1&delay=2", "redis"),
    ("//user:secret@host:6379", "no scheme"),
    ("memory://user:secret@host/?delay=1", "memory"),
    ("direct://user:secret@host", "direct"),
]


@pytest.mark.parametrize(("url", "why"), SECRET_URLS, ids=[u for u, _ in SECRET_URLS])
def test_errors_never_show_the_password(url, why):
    with pytest.raises(ConfigurationError) as info:
        updatebuffer.from_url(url, flush=noop_flush)
    message = str(info.value)
    assert "secret" not in message
    assert "secret" not in repr(info.value)


def test_parse_options_errors_never_show_the_password():
    table = {"delay": duration(0.0)}
    for url in (
        "x://user:secret@host/0?bogus=1",
        "x://user:secret@host/0?delay=1&delay=1",
        "x://user:secret@host/0?delay=abc",
    ):
        with pytest.raises(ConfigurationError) as info:
            parse_options("x", table, url, {})
        assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("redis://:pw@[::1/0", "Invalid IPv6 URL"),
        ("redis://127.0.0.1:99999/0", "Port out of range"),
        ("redis://127.0.0.1:abc/0", "Port could not be cast"),
        ("redis://127.0.0.1:6379/abc", "the path must be a database number"),
        ("redis+cluster://127.0.0.1:7000/3", "only database 0"),
        ("redis+cluster://127.0.0.1:7000?db=1", "only database 0"),
        ("memory://[", "Invalid IPv6 URL"),
    ],
)
def test_malformed_urls_are_configuration_errors_before_any_connection(url, fragment):
    # Nothing listens on these ports: a mistake in the URL is told as one, not as an outage.
    pytest.importorskip("redis")
    with pytest.raises(ConfigurationError, match=fragment) as info:
        updatebuffer.from_url(url, flush=lambda batch: None)
    assert "pw" not in str(info.value)
