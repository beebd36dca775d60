"""What the core's and the SQLAlchemy plugin's wheel and sdist carry, built as a release would be.

Built with hatchling (the build backend both pyprojects name) into a temporary directory.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "updatebuffer-sqlalchemy"


def _build(project: Path, out: Path) -> tuple[Path, Path]:
    proc = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-d", str(out)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [wheel] = out.glob("*.whl")
    [sdist] = out.glob("*.tar.gz")
    return wheel, sdist


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return _build(ROOT, tmp_path_factory.mktemp("core"))


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    return _build(PLUGIN, tmp_path_factory.mktemp("plugin"))


def _wheel_files(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        [name] = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(zf.read(name).decode())


def _sdist_files(sdist: Path) -> list[str]:
    with tarfile.open(sdist) as tf:
        # Drop the "<name>-<version>/" directory every member starts with.
        return [m.name.split("/", 1)[1] for m in tf.getmembers() if m.isfile()]


def test_core_sdist_holds_only_the_core(core):
    _, sdist = core
    files = _sdist_files(sdist)
    assert not [f for f in files if f.startswith("plugins/") or "/README.md" in f], files
    top = sorted(f for f in files if "/" not in f)
    assert top == [
        ".gitignore",
        "CHANGELOG.md",
        "LICENSE",
        "PKG-INFO",
        "README.md",
        "pyproject.toml",
    ]
    assert "updatebuffer/cli.py" in files
    assert "tests/test_packaging.py" in files


def test_wheels_and_sdists_carry_the_license(core, plugin):
    for wheel, sdist in (core, plugin):
        assert any(f.endswith(".dist-info/licenses/LICENSE") for f in _wheel_files(wheel)), wheel
        assert "LICENSE" in _sdist_files(sdist), sdist
        meta = _metadata(wheel)
        assert meta["License-Expression"] == "BSD-3-Clause"
        assert meta.get_all("License-File") == ["LICENSE"]
    assert (PLUGIN / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()


def test_plugin_requires_a_core_version_that_exists(core, plugin):
    core_version = _metadata(core[0])["Version"]
    [req] = [
        Requirement(r)
        for r in _metadata(plugin[0]).get_all("Requires-Dist")
        if Requirement(r).name == "updatebuffer"
    ]
    assert str(req.specifier), "the plugin must say which updatebuffer it needs"
    assert req.specifier.contains(core_version, prereleases=True)


def test_testing_extra_brings_pytest(core):
    meta = _metadata(core[0])
    assert "testing" in meta.get_all("Provides-Extra")
    testing = [
        req
        for req in map(Requirement, meta.get_all("Requires-Dist"))
        if req.marker is not None and str(req.marker) == 'extra == "testing"'
    ]
    assert [r.name for r in testing] == ["pytest"]
    assert "pip install 'updatebuffer[testing]'" in (ROOT / "README.md").read_text()
