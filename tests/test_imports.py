"""A user of one framework needs only that framework (SPEC §1)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import attentions_jax
import attentions_torch


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("attentions_torch", ("jax", "flax", "optax", "chex")), ("attentions_jax", ("torch",))],
)
def test_package_imports_without_the_other_framework(package, forbidden):
    code = (
        f"import sys, {package}; "
        f"loaded = [m for m in {forbidden!r} if m in sys.modules]; "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_packages_export_the_same_names():
    assert sorted(attentions_torch.__all__) == sorted(attentions_jax.__all__)
    for name in attentions_torch.__all__:
        assert hasattr(attentions_torch, name) and hasattr(attentions_jax, name)
