"""The wheel ships every package and module of the source tree (``parity.bench`` included).

The wheel is built from a copy of the sources, through setuptools' PEP 517 backend in
this environment (no build isolation, no network), so the check sees what ``pip install
.`` would install, and the checkout gets no ``build/`` or ``*.egg-info`` of its own.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("attentions_torch", "attentions_jax", "parity")
PROJECT_FILES = ("pyproject.toml", "README.md", "LICENSE")

_BUILD = "import sys, setuptools.build_meta as backend; print(backend.build_wheel(sys.argv[1]))"


def _source_modules() -> set[str]:
    """Every ``.py`` under the packages, as wheel paths (``parity/bench/cli.py``)."""
    return {
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }


def _source_packages() -> set[str]:
    """Every folder with an ``__init__.py`` under the packages, dotted (``parity.bench``)."""
    return {
        path.rsplit("/", 1)[0].replace("/", ".")
        for path in _source_modules()
        if path.endswith("/__init__.py")
    }


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    """The file names inside a wheel built from a copy of the project."""
    pytest.importorskip("setuptools", minversion="70.1")  # bdist_wheel built in (dev extra)
    work = tmp_path_factory.mktemp("packaging")
    source, dist = work / "source", work / "dist"
    source.mkdir()
    for name in PROJECT_FILES:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=ignore)
    built = subprocess.run(
        [sys.executable, "-c", _BUILD, str(dist)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    name = built.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(dist / name) as wheel:
        return set(wheel.namelist())


def test_the_source_tree_has_subpackages():
    """The walk finds nested packages, so the checks below are not vacuous."""
    assert {*PACKAGES, "parity.bench"} <= _source_packages()


def test_the_wheel_ships_every_package(wheel_files):
    shipped = {
        name.rsplit("/", 1)[0].replace("/", ".")
        for name in wheel_files
        if name.endswith("/__init__.py")
    }
    assert _source_packages() - shipped == set()


def test_the_wheel_ships_every_module(wheel_files):
    assert _source_modules() - wheel_files == set()
