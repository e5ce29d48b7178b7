"""``python -m parity.bench.sharded``: memory per device and bytes exchanged of the
sequence-parallel layers (``attentions_jax.parallel``, SPEC §13), compiled, never run.

For each mechanism at its benchmark size (``bench_kwargs``) and a length L, it compiles
the layer's fast path on the whole sequence on one device and the same layer under
``jax.shard_map`` over N devices (``sequence_parallel="seq"``, each device holding L/N
positions), forward and forward+backward, and reads XLA's ``memory_analysis()`` of each:
temporaries + arguments + outputs, per device. It also counts the bytes each device
sends in the forward (the operands of the collectives in the program, a loop's body
counted once per trip). JAX on the CPU has one device unless told otherwise, so the
command starts itself again with ``--xla_force_host_platform_device_count=N`` when it
has fewer than N.

Shape legend: B batch (1 here), L length, N devices, E model width.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from ..mechanisms import MECHANISMS, by_name

__all__ = ["ShardedFigures", "exchanged_bytes", "main", "measure"]

MIB = 2**20
COLLECTIVES = ("ppermute", "all_gather", "psum", "all_to_all", "reduce_scatter", "psum_scatter")
"""The primitives whose operands leave the device."""


@dataclass(frozen=True)
class ShardedFigures:
    """One mechanism's figures; bytes per device."""

    mechanism: str
    length: int
    devices: int
    is_causal: bool
    layout: str
    forward_one: int
    forward_sharded: int
    training_one: int
    training_sharded: int
    exchanged: int

    def row(self) -> str:
        def ratio(sharded: int, one: int) -> str:
            return f"{sharded / MIB:9.1f} {one / MIB:9.1f}  1/{one / sharded:4.1f}"

        return (
            f"{self.mechanism:<11} {'causal' if self.is_causal else 'full':<7}"
            f"{self.layout:<11}{ratio(self.forward_sharded, self.forward_one)}  "
            f"{ratio(self.training_sharded, self.training_one)}  "
            f"{self.exchanged / MIB:9.2f}"
        )


HEADER = (
    f"{'mechanism':<11} {'':<7}{'layout':<11}"
    f"{'fwd/dev':>9} {'fwd one':>9}  {'ratio':>6}  "
    f"{'train/dev':>9} {'train one':>9}  {'ratio':>6}  {'sent MiB':>9}"
)


def _subjaxprs(params: dict) -> Iterator:
    import jax

    for value in params.values():
        values = value if isinstance(value, tuple | list) else (value,)
        for item in values:
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def _sent(jaxpr, trips: int = 1) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in COLLECTIVES:
            total += trips * sum(
                v.aval.size * v.aval.dtype.itemsize for v in eqn.invars if hasattr(v, "aval")
            )
        inner = trips * (eqn.params.get("length", 1) if name == "scan" else 1)
        for sub in _subjaxprs(eqn.params):
            total += _sent(sub, inner)
    return total


def exchanged_bytes(fn: Callable, *args) -> int:
    """Bytes one device hands to collectives when ``fn(*args)`` runs (``fn`` calls
    ``jax.shard_map``): the operand sizes of every ppermute, all_gather, psum, ... in its
    program, a ``scan``'s body counted once per step and a ``while`` body once."""
    import jax

    return _sent(jax.make_jaxpr(fn)(*args).jaxpr)


def measure(
    name: str, *, length: int, devices: int, is_causal: bool = True, layout: str = "contiguous"
) -> ShardedFigures:
    """The figures of mechanism ``name`` at L = ``length`` over ``devices`` devices."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from attentions_jax.parallel import SequenceParallel

    mechanism = by_name(name)
    layer = mechanism.layer_class("jax")(**mechanism.bench_kwargs)
    width = mechanism.bench_kwargs["d_model"]
    x = jax.ShapeDtypeStruct((1, length, width), jnp.float32)
    variables = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros((1, 8, width))))
    mesh = jax.make_mesh(
        (devices,),
        ("seq",),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:devices],
    )
    call = {"is_causal": is_causal, "need_weights": False}

    def whole(variables, x):
        return layer.apply(variables, x, **call)[0]

    sharded = jax.shard_map(
        lambda v, x: layer.apply(v, x, sequence_parallel=SequenceParallel("seq", layout), **call)[
            0
        ],
        mesh=mesh,
        in_specs=(P(), P(None, "seq", None)),
        out_specs=P(None, "seq", None),
    )

    def footprint(fn: Callable, training: bool) -> int:
        if training:
            fn = jax.grad(lambda v, x, f=fn: f(v, x).sum(), argnums=(0, 1))
        memory = jax.jit(fn).lower(variables, x).compile().memory_analysis()
        return (
            memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
        )

    concrete = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), variables)
    return ShardedFigures(
        mechanism=name,
        length=length,
        devices=devices,
        is_causal=is_causal,
        layout=layout,
        forward_one=footprint(whole, False),
        forward_sharded=footprint(sharded, False),
        training_one=footprint(whole, True),
        training_sharded=footprint(sharded, True),
        exchanged=exchanged_bytes(sharded, concrete, jnp.zeros(x.shape, x.dtype)),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m parity.bench.sharded",
        description="Per-device memory (compiled memory_analysis, never run) and bytes sent "
        "of the sequence-parallel JAX layers against one device.",
    )
    names = [m.name for m in MECHANISMS]
    parser.add_argument("--mechanism", action="append", choices=names, help="default: all")
    parser.add_argument("--length", type=int, default=32768, help="L (default 32768)")
    parser.add_argument("--devices", type=int, default=8, help="N (default 8)")
    parser.add_argument("--full", action="store_true", help="not causal (default: causal)")
    parser.add_argument("--layout", choices=("contiguous", "zigzag"), default="contiguous")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    import jax

    if jax.device_count() < args.devices:
        if flag in os.environ.get("XLA_FLAGS", ""):
            raise SystemExit(f"{args.devices} devices were asked for, JAX has {jax.device_count()}")
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()}
        command = [sys.executable, "-m", "parity.bench.sharded", *(argv or sys.argv[1:])]
        return subprocess.run(command, env=env, check=False).returncode
    names = args.mechanism or [m.name for m in MECHANISMS]
    if not args.json:
        print(
            f"L = {args.length} over {args.devices} devices (one: the same layer on one "
            "device), MiB per device"
        )
        print(HEADER)
    for name in names:
        figures = measure(
            name,
            length=args.length,
            devices=args.devices,
            is_causal=not args.full,
            layout=args.layout,
        )
        print(json.dumps(asdict(figures)) if args.json else figures.row(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
