"""Move weights between a PyTorch ``state_dict`` and Flax ``params`` (docs/semantics.md).

The generic rules, which also cover users' own models built from these layers:

=========================  ==========================  ====================================
PyTorch                    Flax                        tensor
=========================  ==========================  ====================================
``Linear.weight``          ``Dense.kernel``            ``(out, in)`` ↔ ``(in, out)``
``Conv1d.weight``          ``Conv.kernel``             ``(out, in, k)`` ↔ ``(k, in, out)``
``Conv2d.weight``          ``Conv.kernel``             ``(out, in, kh, kw)`` ↔
                                                       ``(kh, kw, in, out)``
``Conv3d.weight``          ``Conv.kernel``             spatial axes first, then in, out
``LayerNorm.weight``       ``LayerNorm.scale``         unchanged
``RMSNorm.weight``         ``RMSNorm.scale``           unchanged
``GroupNorm.weight``       ``GroupNorm.scale``         unchanged
``Embedding.weight``       ``Embed.embedding``         unchanged
``<any of these>.bias``    ``bias``                    unchanged
=========================  ==========================  ====================================

A convolution's ``in`` is ``in_channels / groups`` in both frameworks
(``feature_group_count`` in Flax); padding, stride and dilation are the layer's
configuration, not its weights, and are the user's to match (PyTorch's ``padding=p`` is
Flax's ``padding=((p, p),)``). Module paths map ``a.b.0.c`` ↔
``{"a": {"b_0": {"c": ...}}}`` (Flax names list submodules ``b_0``). Values are copied bit
for bit (a transpose moves values, it does not round them), so a round trip is exact in
every dtype.

How the rule for a ``weight`` is chosen, PyTorch to Flax:

* from a module (``torch_to_flax(module)``): by the type of the submodule that owns it
  (subclasses included), after the ``rules=`` given, which add or override rules for
  other module types (see below). Every ``state_dict`` entry must be covered: a parameter of any
  other module type (``BatchNorm*``, ``ConvTranspose*``, ``MultiheadAttention``'s
  ``in_proj_weight``, a bare ``nn.Parameter`` on a custom module, ...) and every persistent
  buffer (``BatchNorm``'s ``running_mean``, ...) raise a ``ConversionError`` that names
  it. Non-persistent buffers are not in a ``state_dict`` and are not converted.
* from a bare ``state_dict`` with ``like=`` Flax params (``torch_to_flax(sd, like=...)``,
  ``parity.load_flax_params(path, like=...)``): by the leaf at the same path in ``like``
  (a 2-D ``kernel``: Dense; a 3-D or larger ``kernel``: Conv; ``scale``; ``embedding``);
  a key that ``like`` does not have falls back to the next rule.
* from a bare ``state_dict`` alone: a 2-D ``weight`` is a ``Linear`` and a 1-D one a
  norm's scale; any other rank is ambiguous (a convolution? a 2-D LayerNorm?) and raises
  a ``ConversionError`` naming the key: pass the module, or ``like=``. An ``Embedding``
  needs the module or ``like=`` (read bare, it would be transposed as a ``Linear``).

Model-level rules (``torch_to_flax(module, rules=..., mapping=...)`` and
``parity.trace(..., rules=..., mapping=...)``), for a model not built from these layers
(a Hugging Face checkpoint; ``parity.hf`` has LLaMA's):

* ``rules``: ``{module type or type name: {leaf: kind}}``, the kinds ``"linear"``,
  ``"conv"``, ``"scale"``, ``"embedding"`` and ``"bias"`` of the table above, for the
  ``weight`` / ``bias`` entries of modules of that type (a type matches its subclasses; a
  name, such as ``"LlamaRMSNorm"``, matches a class of that name in the type's MRO, so
  the library that defines it need not be imported). E.g.
  ``{"LlamaRMSNorm": {"weight": "scale"}}``. A given rule wins over the built-in ones.
* ``mapping``: ``{PyTorch module path prefix: Flax path}`` renames modules whose names
  differ, ``{"model.layers": "blocks", "model.layers.0.self_attn.q_proj":
  "blocks_0/attn/w_q"}`` (dotted on the left, ``/``-separated on the right; the longest
  matching prefix wins and the rest of the path follows: ``model.layers.3.mlp`` ->
  ``blocks_3/mlp``).
* Tied parameters (one ``nn.Parameter`` owned by several modules, as a language model's
  ``lm_head`` tied to its token embedding): converted once, under the first name
  ``named_parameters()`` gives (the Flax port reuses that one parameter, e.g. with
  ``nn.Embed.attend``); the ``state_dict``'s other names for it are left out.

Flax NNX models (``torch_to_nnx`` / ``nnx_to_torch``) use the same rules: an NNX model's
``nnx.Param`` state is read as linen params, its list items ``blocks.0`` (NNX's path
``("blocks", 0)``) as linen's ``blocks_0``, so ``a.b.0.c`` in PyTorch is ``a.b.0.c`` in
NNX too.

Flax to PyTorch needs no types: a ``kernel`` of rank 2 is a ``Dense`` kernel, of rank 3 or
more a ``Conv`` kernel (so a ``DenseGeneral`` kernel, rank 3+, does not convert), and
``scale`` and ``embedding`` become ``weight``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch
from flax import nnx
from torch import nn

__all__ = [
    "ConversionError",
    "cache_to_jax",
    "cache_to_torch",
    "flax_to_numpy_state",
    "flax_to_torch",
    "nnx_params",
    "nnx_to_torch",
    "numpy_state_to_flax",
    "torch_to_flax",
    "torch_to_nnx",
]

_LIST_INDEX = re.compile(r"^(.+)_(\d+)$")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = tuple(
    t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.GroupNorm) if t is not None
)
_SUPPORTED = "Linear, Conv1d/2d/3d, LayerNorm, RMSNorm, GroupNorm and Embedding"


class ConversionError(ValueError):
    """Raised when entries are missing, unexpected, mis-shaped or have no conversion rule."""


def _torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _numpy_to_torch(a: np.ndarray) -> torch.Tensor:
    a = np.array(a, order="C")  # a contiguous copy; 0-d stays 0-d
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


Rules = Mapping[type | str, Mapping[str, str]]
"""Extra conversion rules: a module type or type name -> ``{leaf: kind}`` (module docstring)."""


def _given_rule(module: nn.Module, rules: Rules | None) -> dict[str, str] | None:
    """The rule ``rules`` has for ``module``'s type (or a base class, by type or name)."""
    for cls in type(module).__mro__ if rules else ():
        for key in (cls, cls.__name__):
            if key in rules:
                return dict(rules[key])
    return None


def _rule(module: nn.Module, rules: Rules | None = None) -> dict[str, str] | None:
    """``{leaf: kind}`` for a module type with a rule (``rules`` first), else ``None``."""
    given = _given_rule(module, rules)
    if given is not None:
        return given
    if isinstance(module, nn.Linear):
        return {"weight": "linear", "bias": "bias"}
    if isinstance(module, _CONVS):
        return {"weight": "conv", "bias": "bias"}
    if isinstance(module, _NORMS):
        return {"weight": "scale", "bias": "bias"}
    if isinstance(module, nn.Embedding):
        return {"weight": "embedding"}
    return None


def _module_kinds(module: nn.Module, rules: Rules | None = None) -> dict[str, str]:
    """``{"path.leaf": kind}`` for every parameter of a module type that has a rule."""
    kinds = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        rule = _rule(sub, rules)
        if rule is None:
            continue
        prefix = f"{path}." if path else ""
        for leaf, param in sub.named_parameters(recurse=False):
            if param is not None and leaf in rule:
                kinds[f"{prefix}{leaf}"] = rule[leaf]
    return kinds


def _state_kinds(
    module: nn.Module, state: Mapping[str, torch.Tensor], rules: Rules | None = None
) -> dict[str, str]:
    """``_module_kinds``, with a ``ConversionError`` naming every ``state`` entry (a
    parameter of a type without a rule, a persistent buffer) that has none."""
    kinds = _module_kinds(module, rules)
    no_rule = [key for key in state if key not in kinds]
    if no_rule:
        raise ConversionError(
            "no conversion rule for "
            + ", ".join(_describe(module, key) for key in no_rule)
            + f"; rules exist for the parameters of {_SUPPORTED} (others: rules=)"
        )
    return kinds


def _module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` without the second and later names of a tied parameter."""
    seen: set[int] = set()
    aliases = set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return {k: v for k, v in module.state_dict().items() if k not in aliases}


def _linen_key(parts) -> tuple[str, ...]:
    """``("blocks", "0", "attn")`` or ``("blocks", 0, "attn")`` -> ``("blocks_0", "attn")``."""
    return _linen_path(tuple(int(p) if str(p).isdigit() else p for p in parts))


def _flax_key(torch_path: str, mapping: Mapping[str, str]) -> tuple[str, ...]:
    """The linen-style path of the Flax module that mirrors the PyTorch module ``torch_path``
    (``mapping``: module docstring)."""
    parts = torch_path.split(".") if torch_path else []
    prefixes = [p.split(".") for p in mapping if p and parts[: p.count(".") + 1] == p.split(".")]
    if prefixes:
        prefix = max(prefixes, key=len)
        target = [name for name in mapping[".".join(prefix)].split("/") if name]
        parts = [*target, *parts[len(prefix) :]]
    return _linen_key(parts)


def _renamed(key: str, mapping: Mapping[str, str]) -> str:
    """A ``state_dict`` key with its module path renamed by ``mapping``
    (``"model.layers.0.self_attn.q_proj.weight"`` -> ``"blocks_0.attn.w_q.weight"``)."""
    module, _, leaf = key.rpartition(".")
    return ".".join((*_flax_key(module, mapping), leaf))


def _describe(module: nn.Module, key: str) -> str:
    """``"'bn.running_mean' (buffer of BatchNorm1d)"`` for an entry without a rule."""
    path, _, leaf = key.rpartition(".")
    try:
        owner = module.get_submodule(path)
    except AttributeError:
        return repr(key)
    what = "buffer" if leaf in dict(owner.named_buffers(recurse=False)) else "entry"
    if leaf in dict(owner.named_parameters(recurse=False)):
        what = "parameter"
    return f"{key!r} ({what} of {type(owner).__name__})"


def _flax_path(torch_key: str) -> tuple[str, ...]:
    """``"a.b.0.weight"`` -> ``("a", "b_0")`` (the module path, without the leaf)."""
    parts: list[str] = []
    for part in torch_key.split(".")[:-1]:
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


def _torch_path(flax_path: tuple[str, ...]) -> str:
    """``("a", "b_0")`` -> ``"a.b.0"``."""
    parts = []
    for part in flax_path:
        match = _LIST_INDEX.match(part)
        parts.extend(match.groups() if match else (part,))
    return ".".join(parts)


def _check_against(given: Mapping[str, tuple], expected: Mapping[str, tuple], what: str) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = sorted(
        f"{k}: expected {expected[k]}, got {given[k]}"
        for k in set(given) & set(expected)
        if tuple(given[k]) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped [{'; '.join(misshaped)}]")
    if problems:
        raise ConversionError(f"{what}: " + ", ".join(problems))


def _flatten(params: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple, Any]:
    flat = {}
    for name, value in params.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, (*prefix, name)))
        else:
            flat[(*prefix, name)] = value
    return flat


def _unflatten(flat: Mapping[tuple, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def _unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """``params`` from ``{"params": params}`` (what ``init`` returns), else unchanged."""
    return params["params"] if "params" in params and len(params) == 1 else params


def _kinds_from_like(keys: list[str], like: Mapping[str, Any]) -> dict[str, str]:
    """Kinds of ``weight`` keys read off the Flax leaf at the same path in ``like``."""
    flat = _flatten(_unwrap(like))
    kinds = {}
    for key in keys:
        if key.rsplit(".", 1)[-1] != "weight":
            continue
        path = _flax_path(key)
        if (*path, "kernel") in flat:
            kinds[key] = "linear" if np.ndim(flat[(*path, "kernel")]) == 2 else "conv"
        elif (*path, "scale") in flat:
            kinds[key] = "scale"
        elif (*path, "embedding") in flat:
            kinds[key] = "embedding"
    return kinds


def _conv_to_flax(weight: np.ndarray) -> np.ndarray:
    """``(out, in, *spatial)`` -> ``(*spatial, in, out)``."""
    return np.ascontiguousarray(np.transpose(weight, (*range(2, weight.ndim), 1, 0)))


def _conv_to_torch(kernel: np.ndarray) -> np.ndarray:
    """``(*spatial, in, out)`` -> ``(out, in, *spatial)``."""
    n = kernel.ndim
    return np.ascontiguousarray(np.transpose(kernel, (n - 1, n - 2, *range(n - 2))))


def numpy_state_to_flax(
    state: Mapping[str, np.ndarray], kinds: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Flax ``params`` (NumPy leaves) from a PyTorch-layout ``{key: array}`` mapping.

    ``kinds`` maps ``weight`` keys to a rule, ``"linear"``, ``"conv"``, ``"scale"`` (also
    spelled ``"layernorm"``) or ``"embedding"`` (what ``torch_to_flax`` reads off the module
    or ``like``); a ``weight`` without one follows the bare-``state_dict`` rule: 2-D is a
    ``Linear``, 1-D a norm's scale, any other rank a ``ConversionError``. A
    ``ConversionError`` names every entry that cannot convert.
    """
    kinds = kinds or {}
    flat = {}
    problems = []
    for key, value in state.items():
        path, leaf = _flax_path(key), key.rsplit(".", 1)[-1]
        if leaf == "bias":
            flat[(*path, "bias")] = value
            continue
        if leaf != "weight":
            problems.append(f"unexpected entry {key!r}: only weight and bias convert")
            continue
        kind = kinds.get(key)
        if kind is None and value.ndim not in (1, 2):
            problems.append(
                f"{key!r}: a {value.ndim}-D weight from a bare state_dict is ambiguous; "
                f"pass the module so its type can be read (or like= Flax params)"
            )
            continue
        kind = kind or ("linear" if value.ndim == 2 else "scale")
        if kind == "linear" and value.ndim == 2:
            flat[(*path, "kernel")] = np.ascontiguousarray(value.T)
        elif kind == "conv" and value.ndim >= 3:
            flat[(*path, "kernel")] = _conv_to_flax(value)
        elif kind in ("scale", "layernorm"):
            flat[(*path, "scale")] = value
        elif kind == "embedding" and value.ndim == 2:
            flat[(*path, "embedding")] = value
        else:
            problems.append(f"{key!r}: a {value.ndim}-D weight cannot be a {kind} weight")
    if problems:
        raise ConversionError("; ".join(problems))
    return _unflatten(flat)


def flax_to_numpy_state(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """PyTorch-layout ``{key: array}`` from Flax ``params`` (the inverse of the above).

    A ``kernel`` of rank 2 is a ``Dense`` kernel (transposed), of rank 3 or more a ``Conv``
    kernel (spatial axes moved last); ``scale`` and ``embedding`` become ``weight``.
    """
    params = _unwrap(params)
    state = {}
    for path, value in _flatten(params).items():
        value = np.asarray(value)
        module, leaf = _torch_path(path[:-1]), path[-1]
        prefix = f"{module}." if module else ""
        if leaf == "kernel" and value.ndim == 2:
            state[f"{prefix}weight"] = np.ascontiguousarray(value.T)
        elif leaf == "kernel" and value.ndim >= 3:
            state[f"{prefix}weight"] = _conv_to_torch(value)
        elif leaf == "kernel":
            raise ConversionError(
                f"{'/'.join(path)!r}: a {value.ndim}-D kernel is neither a Dense (2-D) nor a "
                f"Conv (3-D or more) kernel"
            )
        elif leaf in ("scale", "embedding"):
            state[f"{prefix}weight"] = value
        elif leaf == "bias":
            state[f"{prefix}bias"] = value
        else:
            raise ConversionError(
                f"unexpected entry {'/'.join(path)!r}: only kernel, bias, scale and "
                f"embedding convert"
            )
    return state


def torch_to_flax(
    source: nn.Module | Mapping[str, torch.Tensor],
    *,
    like: Mapping[str, Any] | None = None,
    rules: Rules | None = None,
    mapping: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Flax ``params`` (``jax.Array`` leaves, same dtypes) from a module or its state_dict.

    Args:
      source: a ``torch.nn.Module`` (each entry converts by the type of the submodule that
        owns it; an entry of a type without a rule, or a persistent buffer, raises a
        ``ConversionError`` naming it) or a ``state_dict`` (rules read off ``like`` where
        it has the key, else 2-D ``weight``: Linear, 1-D: norm scale, other ranks raise).
      like: optional Flax params (e.g. from ``init``) to check names and shapes against;
        a ``ConversionError`` names every missing, unexpected or mis-shaped entry.
      rules: ``{module type or type name: {leaf: kind}}`` for module types without a
        built-in rule (a module ``source`` only), e.g. ``parity.hf.LLAMA_RULES``.
      mapping: ``{PyTorch module path prefix: Flax path}`` for modules named differently,
        e.g. ``parity.hf.llama_mapping(config)`` (module docstring).

    A parameter tied to another (shared by two modules) converts once, under its first
    name. float64 weights need JAX's 64-bit mode (``jax.enable_x64``).
    """
    mapping = dict(mapping or {})
    if isinstance(source, nn.Module):
        unknown = [p for p in mapping if p not in dict(source.named_modules())]
        if unknown:
            raise ValueError(f"mapping names no module of the PyTorch model: {unknown}")
        state = _module_state(source)
        kinds = _state_kinds(source, state, rules)
    else:
        state = source
        kinds = None
    if mapping:
        state = {_renamed(k, mapping): v for k, v in state.items()}
        kinds = None if kinds is None else {_renamed(k, mapping): v for k, v in kinds.items()}
    if kinds is None and like is not None:
        kinds = _kinds_from_like(list(state), like)
    params = numpy_state_to_flax({k: _torch_to_numpy(v) for k, v in state.items()}, kinds)
    if like is not None:
        _check_against(
            {"/".join(p): np.shape(v) for p, v in _flatten(params).items()},
            {"/".join(p): np.shape(v) for p, v in _flatten(_unwrap(like)).items()},
            "Flax params do not match",
        )
    flat = _flatten(params)
    if not jax.config.jax_enable_x64 and any(v.dtype == np.float64 for v in flat.values()):
        raise ConversionError(
            "float64 weights need JAX's 64-bit mode; convert inside "
            "`with jax.enable_x64(True):` or call jax.config.update('jax_enable_x64', True)"
        )
    return _unflatten({p: jnp.asarray(v) for p, v in flat.items()})


def flax_to_torch(
    params: Mapping[str, Any], *, like: nn.Module | Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """A ``state_dict`` for ``load_state_dict`` from Flax ``params`` (or ``{"params": ...}``).

    Args:
      params: Flax params; a ``kernel`` of rank 2 is a Dense kernel, of rank 3 or more a
        Conv kernel (see the module docstring).
      like: optional module or state_dict to check names and shapes against; a
        ``ConversionError`` names every missing, unexpected or mis-shaped entry.
    """
    state = {k: _numpy_to_torch(v) for k, v in flax_to_numpy_state(params).items()}
    if like is not None:
        ref = like.state_dict() if isinstance(like, nn.Module) else like
        _check_against(
            {k: tuple(v.shape) for k, v in state.items()},
            {k: tuple(v.shape) for k, v in ref.items()},
            "state_dict does not match",
        )
    return state


def _linen_path(path: tuple) -> tuple[str, ...]:
    """An NNX state path as a linen one: an integer index joins its parent (``b``, 0 ->
    ``b_0``)."""
    names: list[str] = []
    for key in path:
        if isinstance(key, int) and names:
            names[-1] = f"{names[-1]}_{key}"
        else:
            names.append(str(key))
    return tuple(names)


def nnx_params(model: nnx.Module) -> dict[str, Any]:
    """An NNX model's ``nnx.Param`` values as linen-style params (``blocks_0/...``)."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return _unflatten({_linen_path(path): value for path, value in _flatten(pure).items()})


def torch_to_nnx(source: nn.Module | Mapping[str, torch.Tensor], model: nnx.Module) -> nnx.Module:
    """Load a PyTorch module's (or ``state_dict``'s) weights into an NNX ``model``, in place.

    The rules of ``torch_to_flax``, checked against the model's own ``nnx.Param`` tree: a
    ``ConversionError`` names every missing, unexpected or mis-shaped entry. The values
    (and so the dtype) are the PyTorch weights', bit for bit. Returns ``model``.

    Example::

        layer = attentions_jax.nnx.MultiHeadSelfAttention(64, 8, rngs=nnx.Rngs(0))
        parity.torch_to_nnx(torch_layer, layer)
    """
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    paths = {_linen_path(path): path for path in _flatten(pure)}
    params = _flatten(torch_to_flax(source, like=nnx_params(model)))
    nnx.replace_by_pure_dict(state, _unflatten({paths[p]: v for p, v in params.items()}))
    nnx.update(model, state)
    return model


def nnx_to_torch(
    model: nnx.Module, *, like: nn.Module | Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """A ``state_dict`` from an NNX model's parameters (``flax_to_torch`` of
    ``nnx_params(model)``); ``like`` checks names and shapes as there."""
    return flax_to_torch(nnx_params(model), like=like)


CACHES = ("KVCache", "WindowCache", "LinearCache")
"""The cache types of ``attentions_torch.cache`` / ``attentions_jax.cache``: the same names,
fields, shapes and dtypes in both packages."""


def _convert_caches(caches: Any, to: str, leaf) -> Any:
    """Rebuild ``caches`` (a cache, or lists, tuples and dicts of them) as the ``to``
    package's cache types, each field through ``leaf``."""
    kind = type(caches).__name__
    if kind in CACHES and hasattr(caches, "_fields"):
        package = importlib.import_module(to)
        return getattr(package, kind)(*(leaf(field) for field in caches))
    if isinstance(caches, Mapping):
        return {key: _convert_caches(value, to, leaf) for key, value in caches.items()}
    if isinstance(caches, list | tuple) and not hasattr(caches, "_fields"):
        return type(caches)(_convert_caches(value, to, leaf) for value in caches)
    raise ConversionError(
        f"expected a decoding cache ({', '.join(CACHES)}) or a list, tuple or dict of them, "
        f"got {kind}"
    )


def cache_to_jax(caches: Any) -> Any:
    """A PyTorch decoding cache (``layer.init_cache`` / ``decode``) as the JAX cache of the
    same name, fields copied bit for bit; also lists, tuples and dicts of caches (a
    model's). Decoding goes on in JAX from where PyTorch stopped. float64 caches need
    JAX's 64-bit mode."""

    def leaf(tensor: torch.Tensor) -> jax.Array:
        array = _torch_to_numpy(tensor)
        if array.dtype == np.float64 and not jax.config.jax_enable_x64:
            raise ConversionError("a float64 cache needs JAX's 64-bit mode (jax.enable_x64)")
        return jnp.asarray(array)

    return _convert_caches(caches, "attentions_jax", leaf)


def cache_to_torch(caches: Any, *, device: torch.device | str | None = None) -> Any:
    """A JAX decoding cache as the PyTorch cache of the same name (on ``device``), fields
    copied bit for bit; also lists, tuples and dicts of caches."""
    return _convert_caches(
        caches, "attentions_torch", lambda a: _numpy_to_torch(np.asarray(a)).to(device)
    )
