"""Both packages expose the same classes with the same constructor arguments and defaults."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import attentions_jax as aj
import attentions_torch as at

CLASSES = sorted(
    name
    for name in at.__all__
    if inspect.isclass(getattr(at, name))
    and issubclass(getattr(at, name), at.SelfAttention)
    and getattr(at, name) is not at.SelfAttention
)


def test_same_public_names():
    assert sorted(at.__all__) == sorted(aj.__all__)
    assert len(CLASSES) >= 2


def _torch_arguments(cls) -> list[tuple[str, object]]:
    """The subclass's positional parameters, then the options of ``SelfAttention`` with the
    defaults the subclass overrides as keyword-only parameters (``rope=True`` on Rotary)."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    own = [(p.name, p.default) for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    overrides = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        return own + list(overrides.items())
    options = [
        (p.name, overrides.get(p.name, p.default))
        for p in inspect.signature(at.SelfAttention.__init__).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    ]
    return own + options


def _flax_arguments(cls) -> list[tuple[str, object]]:
    """Dataclass fields in ``__init__`` order: positional ones, then keyword-only ones."""
    fields = [f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]
    ordered = [f for f in fields if not f.kw_only] + [f for f in fields if f.kw_only]
    return [(f.name, f.default) for f in ordered]


@pytest.mark.parametrize("name", CLASSES)
def test_same_constructor_arguments_and_defaults(name):
    empty = inspect.Parameter.empty
    torch_args = [(n, None if d is empty else d) for n, d in _torch_arguments(getattr(at, name))]
    flax_args = [
        (n, None if d is dataclasses.MISSING else d) for n, d in _flax_arguments(getattr(aj, name))
    ]
    assert sorted(torch_args, key=str) == sorted(flax_args, key=str)
    assert [n for n, _ in torch_args] == [n for n, _ in flax_args]
