from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import uuid

import pytest

import updatebuffer
from updatebuffer import registry
from updatebuffer.backends.direct import DirectBuffer
from updatebuffer.backends.memory import MemoryBuffer
from updatebuffer.errors import (
    BackendNotFoundError,
    ConfigurationError,
    MissingDependencyError,
)
from updatebuffer.routing import Crc32Router, KetamaRouter


def noop_flush(batch):
    pass


@pytest.fixture(autouse=True)
def clean_registry():
    """Undo register_backend/register_router calls and forget classes loaded by a test."""
    with registry._lock:
        registered = {group: dict(names) for group, names in registry._registered.items()}
        loaded = dict(registry._loaded)
    yield
    with registry._lock:
        for group, names in registry._registered.items():
            names.clear()
            names.update(registered[group])
        registry._loaded.clear()
        registry._loaded.update(loaded)


PLUGIN_SOURCE = '''
class {cls}:
    """A third-party backend: only the from_url classmethod is required to be selected."""

    def __init__(self, *, flush, url, options):
        self.flush = flush
        self.url = url
        self.options = options

    @classmethod
    def from_url(cls, url, *, flush, **options):
        return cls(flush=flush, url=url, options=options)
'''


class Site:
    """A directory on sys.path holding real ``*.dist-info`` distributions and their modules."""

    def __init__(self, path, monkeypatch):
        self.path = path
        self.monkeypatch = monkeypatch
        self.modules = []
        path.mkdir()

    def module(self, source):
        name = f"ub_plugin_{uuid.uuid4().hex[:12]}"
        (self.path / f"{name}.py").write_text(textwrap.dedent(source))
        self.modules.append(name)
        return name

    def dist(self, name, entry_points, version="1.0"):
        info = self.path / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = []
        for group, names in entry_points.items():
            lines.append(f"[{group}]")
            lines.extend(f"{ep_name} = {value}" for ep_name, value in names.items())
            lines.append("")
        (info / "entry_points.txt").write_text("\n".join(lines))
        (info / "RECORD").write_text("")

    def activate(self):
        self.monkeypatch.syspath_prepend(str(self.path))
        importlib.invalidate_caches()


@pytest.fixture
def site(tmp_path, monkeypatch):
    made = []

    def make(name="site"):
        s = Site(tmp_path / name, monkeypatch)
        made.append(s)
        return s

    yield make
    for s in made:
        for module in s.modules:
            sys.modules.pop(module, None)


# -- listing -----------------------------------------------------------------------------------


def test_available_backends_lists_builtins_without_importing_them():
    code = textwrap.dedent(
        """
        import sys
        import updatebuffer
        names = updatebuffer.available_backends()
        assert {"memory", "direct", "redis"} <= set(names), names
        assert names == sorted(names), names
        loaded = [m for m in sys.modules if m.startswith("updatebuffer.backends.")]
        assert loaded == [], loaded
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_available_routers_lists_builtins():
    names = updatebuffer.available_routers()
    assert {"crc32", "ketama"} <= set(names)
    assert registry.load_router("crc32") is Crc32Router
    assert registry.load_router("ketama") is KetamaRouter


def test_builtin_backends_load_through_their_entry_points():
    assert registry.load_backend("memory") is MemoryBuffer
    assert registry.load_backend("direct") is DirectBuffer
    assert type(updatebuffer.from_url("memory://", flush=noop_flush)) is MemoryBuffer
    assert type(updatebuffer.from_url("direct://", flush=noop_flush)) is DirectBuffer


# -- third-party backends through entry points -------------------------------------------------


def test_third_party_backend_is_selected_by_url_scheme(site):
    s = site()
    module = s.module(PLUGIN_SOURCE.format(cls="ThirdPartyBuffer"))
    s.dist(
        "updatebuffer-thirdparty",
        {"updatebuffer.backends": {"thirdparty": f"{module}:ThirdPartyBuffer"}},
    )
    s.activate()

    assert "thirdparty" in updatebuffer.available_backends()
    assert module not in sys.modules  # listing imports nothing
    buf = updatebuffer.from_url("thirdparty+tls://host/x?a=1", flush=noop_flush, b=2)
    cls = sys.modules[module].ThirdPartyBuffer
    assert type(buf) is cls  # exactly that class, no wrapper
    assert buf.url == "thirdparty+tls://host/x?a=1"
    assert buf.flush is noop_flush
    assert buf.options == {"b": 2}
    assert type(updatebuffer.from_url("thirdparty://", flush=noop_flush)) is cls
    assert type(updatebuffer.from_config({"backend": "thirdparty"}, flush=noop_flush)) is cls


def test_same_distribution_on_two_path_entries_is_not_a_conflict(site):
    first, second = site("one"), site("two")
    module = first.module(PLUGIN_SOURCE.format(cls="EchoBuffer"))
    for s in (first, second):
        s.dist("updatebuffer-echo", {"updatebuffer.backends": {"echo": f"{module}:EchoBuffer"}})
        s.activate()
    assert type(updatebuffer.from_url("echo://", flush=noop_flush)).__name__ == "EchoBuffer"


def test_two_distributions_claiming_one_name_is_an_error_naming_both(site):
    s = site()
    one = s.module(PLUGIN_SOURCE.format(cls="OneBuffer"))
    two = s.module(PLUGIN_SOURCE.format(cls="TwoBuffer"))
    s.dist("ub-plugin-one", {"updatebuffer.backends": {"dup": f"{one}:OneBuffer"}})
    s.dist("ub-plugin-two", {"updatebuffer.backends": {"dup": f"{two}:TwoBuffer"}})
    s.activate()

    assert updatebuffer.available_backends().count("dup") == 1
    with pytest.raises(ConfigurationError) as info:
        updatebuffer.from_url("dup://", flush=noop_flush)
    message = str(info.value)
    assert "ub-plugin-one" in message
    assert "ub-plugin-two" in message
    assert "'dup'" in message
    assert one not in sys.modules
    assert two not in sys.modules
    # Other backends are unaffected, and the host can settle it explicitly.
    assert type(updatebuffer.from_url("memory://", flush=noop_flush)) is MemoryBuffer
    updatebuffer.register_backend("dup", f"{two}:TwoBuffer", replace=True)
    assert type(updatebuffer.from_url("dup://", flush=noop_flush)).__name__ == "TwoBuffer"


def test_a_plugin_claiming_a_builtin_name_is_a_conflict(site):
    s = site()
    module = s.module(PLUGIN_SOURCE.format(cls="FakeMemory"))
    s.dist("ub-fake-memory", {"updatebuffer.backends": {"memory": f"{module}:FakeMemory"}})
    s.activate()
    # Loaded classes are cached: forget memory (clean_registry restores it), as a new process would.
    registry._loaded.pop((registry.BACKENDS_GROUP, "memory"), None)
    with pytest.raises(ConfigurationError) as info:
        updatebuffer.from_url("memory://", flush=noop_flush)
    assert "ub-fake-memory" in str(info.value)
    assert "updatebuffer" in str(info.value).replace("ub-fake-memory", "")


@pytest.mark.parametrize("kind", ["missing-module", "missing-dependency"])
def test_broken_plugin_breaks_nothing_until_selected(site, kind):
    s = site()
    if kind == "missing-module":
        target = "ub_no_such_module_anywhere:Buffer"
    else:
        module = s.module("import ub_no_such_dependency_anywhere\n\nclass Buffer:\n    pass\n")
        target = f"{module}:Buffer"
    s.dist("ub-broken", {"updatebuffer.backends": {"broken": target}})
    s.activate()

    assert "broken" in updatebuffer.available_backends()
    assert type(updatebuffer.from_url("memory://", flush=noop_flush)) is MemoryBuffer
    assert type(updatebuffer.from_url("direct://", flush=noop_flush)) is DirectBuffer
    with pytest.raises(MissingDependencyError) as info:
        updatebuffer.from_url("broken://", flush=noop_flush)
    err = info.value
    assert isinstance(err, ConfigurationError)
    assert isinstance(err, ImportError)
    assert isinstance(err.__cause__, ImportError)
    assert "pip install" in str(err)
    missing = "ub_no_such_" + ("module" if kind == "missing-module" else "dependency")
    assert missing in err.pip_command


def test_entry_point_that_is_not_a_class_is_an_error(site):
    s = site()
    module = s.module("def make_buffer(url, *, flush):\n    return None\n")
    s.dist("ub-func", {"updatebuffer.backends": {"func": f"{module}:make_buffer"}})
    s.activate()
    with pytest.raises(ConfigurationError, match="not a class"):
        updatebuffer.from_url("func://", flush=noop_flush)


def test_unknown_backend_lists_the_installed_ones():
    with pytest.raises(BackendNotFoundError) as info:
        updatebuffer.from_url("nosuchbackend://", flush=noop_flush)
    err = info.value
    assert isinstance(err, ConfigurationError)
    assert isinstance(err, ValueError)
    assert err.name == "nosuchbackend"
    for name in ("memory", "direct", "redis"):
        assert name in err.available
        assert repr(name) in str(err)
    assert "'nosuchbackend'" in str(err)


def test_url_without_scheme_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="no scheme"):
        updatebuffer.from_url("localhost:6379", flush=noop_flush)


def test_flush_must_be_callable():
    with pytest.raises(ConfigurationError, match="callable"):
        updatebuffer.from_url("memory://", flush=None)


# -- register_backend --------------------------------------------------------------------------


class MyBuffer:
    @classmethod
    def from_url(cls, url, *, flush, **options):
        buf = cls()
        buf.url = url
        buf.options = options
        return buf


class OtherBuffer(MyBuffer):
    pass


def test_register_backend_class():
    updatebuffer.register_backend("mine", MyBuffer)
    assert "mine" in updatebuffer.available_backends()
    buf = updatebuffer.from_url("mine://?x=1", flush=noop_flush)
    assert type(buf) is MyBuffer
    assert buf.url == "mine://?x=1"


def test_register_backend_again_with_the_same_target_is_fine():
    updatebuffer.register_backend("mine", MyBuffer)
    updatebuffer.register_backend("mine", MyBuffer)
    updatebuffer.register_backend("mine", f"{MyBuffer.__module__}:MyBuffer")
    updatebuffer.register_backend("memory", MemoryBuffer)
    updatebuffer.register_backend("memory", "updatebuffer.backends.memory:MemoryBuffer")
    assert type(updatebuffer.from_url("memory://", flush=noop_flush)) is MemoryBuffer


def test_register_backend_with_another_target_needs_replace():
    updatebuffer.register_backend("mine", MyBuffer)
    with pytest.raises(ConfigurationError, match="replace=True") as info:
        updatebuffer.register_backend("mine", OtherBuffer)
    assert isinstance(info.value, ValueError)
    assert type(updatebuffer.from_url("mine://", flush=noop_flush)) is MyBuffer
    updatebuffer.register_backend("mine", OtherBuffer, replace=True)
    assert type(updatebuffer.from_url("mine://", flush=noop_flush)) is OtherBuffer


def test_register_backend_over_an_installed_name_needs_replace():
    with pytest.raises(ConfigurationError, match="already taken"):
        updatebuffer.register_backend("memory", MyBuffer)
    assert type(updatebuffer.from_url("memory://", flush=noop_flush)) is MemoryBuffer
    updatebuffer.register_backend("memory", MyBuffer, replace=True)
    assert type(updatebuffer.from_url("memory://", flush=noop_flush)) is MyBuffer


def test_registration_is_cleaned_up_between_tests():
    assert "mine" not in updatebuffer.available_backends()
    assert type(updatebuffer.from_url("memory://", flush=noop_flush)) is MemoryBuffer


def test_register_backend_by_string_imports_on_first_use(site):
    s = site()
    module = s.module(PLUGIN_SOURCE.format(cls="LazyBuffer"))
    s.activate()
    updatebuffer.register_backend("lazy", f"{module}:LazyBuffer")
    assert "lazy" in updatebuffer.available_backends()
    assert module not in sys.modules
    buf = updatebuffer.from_url("lazy://", flush=noop_flush)
    assert type(buf) is sys.modules[module].LazyBuffer


@pytest.mark.parametrize("name", ["", "a+b", "a:b", None, 3])
def test_register_backend_refuses_bad_names(name):
    with pytest.raises(ConfigurationError):
        updatebuffer.register_backend(name, MyBuffer)


@pytest.mark.parametrize("target", [None, 3, MyBuffer()])
def test_register_backend_refuses_bad_targets(target):
    with pytest.raises(ConfigurationError):
        updatebuffer.register_backend("mine", target)


def test_register_router():
    updatebuffer.register_router("mod", Crc32Router)
    assert "mod" in updatebuffer.available_routers()
    assert registry.load_router("mod") is Crc32Router
    with pytest.raises(ConfigurationError):
        updatebuffer.register_router("crc32", KetamaRouter)
    with pytest.raises(BackendNotFoundError, match="router"):
        registry.load_router("nosuchrouter")


def test_make_router():
    router = registry.make_router("crc32", 3)
    assert isinstance(router, Crc32Router)
    assert router.get_node("key") in range(3)
    assert registry.make_router(router, 3) is router


# -- from_config -------------------------------------------------------------------------------


def test_from_config_sentry_shape_for_memory():
    buf = updatebuffer.from_config(
        {"backend": "memory", "options": {"delay": 5, "batch_size": 10}}, flush=noop_flush
    )
    assert type(buf) is MemoryBuffer
    assert buf.delay == 5.0
    assert type(buf.delay) is float
    assert buf.batch_size == 10


def test_from_config_with_url_and_without_options():
    buf = updatebuffer.from_config(
        {"backend": "memory", "url": "memory://?delay=2", "options": {"batch_size": 7}},
        flush=noop_flush,
    )
    assert (buf.delay, buf.batch_size) == (2.0, 7)
    assert type(updatebuffer.from_config({"backend": "direct"}, flush=noop_flush)) is DirectBuffer


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"backend": "memory", "opts": {}}, "opts"),
        ({"backend": "memory", "OPTIONS": {}, "hosts": {}}, "OPTIONS"),
        ({"options": {}}, "backend"),
        ({"backend": ""}, "backend"),
        ({"backend": 3}, "backend"),
        ({"backend": "memory", "options": [("delay", 1)]}, "options"),
        ({"backend": "memory", "url": "direct://"}, "another backend"),
        ({"backend": "memory", "options": {"nosuch": 1}}, "nosuch"),
        (["backend", "memory"], "mapping"),
    ],
)
def test_from_config_errors(config, match):
    with pytest.raises(ConfigurationError, match=match) as info:
        updatebuffer.from_config(config, flush=noop_flush)
    assert isinstance(info.value, ValueError)


def test_from_config_unknown_backend():
    with pytest.raises(BackendNotFoundError, match="memory"):
        updatebuffer.from_config({"backend": "nosuchbackend"}, flush=noop_flush)
