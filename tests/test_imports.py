"""A user of one framework needs only that framework; ``parity`` says what it lacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import attentions_jax
import attentions_torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("attentions_torch", ("jax", "flax", "optax", "chex")),
        ("attentions_jax", ("torch",)),
        ("attentions_jax.nnx", ("torch",)),
    ],
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


def _python_without(modules: tuple[str, ...], tmp_path: Path):
    """A runner of Python with ``modules`` uninstallable: each is a package that fails to
    import, as a missing one does."""
    for module in modules:
        (tmp_path / module).mkdir()
        (tmp_path / module / "__init__.py").write_text(
            f'raise ModuleNotFoundError("No module named {module}", name="{module}")\n'
        )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}

    def python(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )

    return python


USE_TORCH_LAYER = """
import torch, attentions_torch as a
out, _ = a.MultiHeadSelfAttention(8, 2)(torch.randn(1, 3, 8))
assert out.shape == (1, 3, 8)
"""
USE_FLAX_LAYER = """
import jax, attentions_jax as a
layer, x = a.MultiHeadSelfAttention(8, 2), jax.numpy.ones((1, 3, 8))
out, _ = layer.apply(layer.init(jax.random.key(0), x), x)
assert out.shape == (1, 3, 8)
"""


@pytest.mark.parametrize(
    ("missing", "use", "named"),
    [
        (("torch",), USE_FLAX_LAYER, "PyTorch is"),
        (("jax", "flax"), USE_TORCH_LAYER, "JAX, Flax are"),
    ],
    ids=["jax_only", "torch_only"],
)
def test_one_framework_alone(missing, use, named, tmp_path):
    """The installed framework's package works; parity names what is missing and the
    install line: a sentence on the command line, an ImportError in code."""
    python = _python_without(missing, tmp_path)
    used = python("-c", use)
    assert used.returncode == 0, used.stderr[-2000:]

    command = python("-m", "parity", "--no-progress")
    assert command.returncode == 1, command.stdout + command.stderr
    assert "Traceback" not in command.stderr
    assert f"{named} not installed" in command.stderr
    assert 'pip install "attentions[parity]"' in command.stderr

    imported = python("-c", "import parity")
    assert imported.returncode == 1
    assert "ModuleNotFoundError: parity needs PyTorch and JAX/Flax" in imported.stderr


@pytest.mark.parametrize("command", ["parity", "parity.bench"])
def test_an_absent_device_is_a_usage_error(command):
    if command == "parity" and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = subprocess.run(
        [sys.executable, "-m", command, "--device", "cuda"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "--device cuda:" in result.stderr and "Traceback" not in result.stderr
