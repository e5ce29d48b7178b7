"""Train the twin language models side by side and generate from both.

``python -m examples.twin_lm --mechanism local --steps 100 --plot docs/twin_lm_loss.png``

One ``TwinLM`` is built in PyTorch (``examples.twin_lm_torch``), its initial weights are
moved into the Flax twin (``examples.twin_lm_flax``) with ``parity.torch_to_flax``, and both
train on the same batches, PyTorch with ``torch.optim.AdamW`` and JAX with
``optax.adamw`` (the same hyperparameters): the two loss curves are the same function of
the step up to rounding. The data is generated here, no download: sequences of a fixed
random Markov chain over a small vocabulary (each token has two likely successors), so
the loss falls from ``log V`` towards the chain's entropy. Then both models generate
greedily through their caches (``decode``) from the same prompts.

Shape legend: S steps, B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import parity

from . import twin_lm_flax, twin_lm_torch

VOCAB = 16
HYPER = {"lr": 3e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01}


def markov_batches(steps: int, batch: int, length: int, *, seed: int = 0) -> np.ndarray:
    """``(S, B, T + 1)`` int64 token sequences of one fixed random Markov chain."""
    rng = np.random.default_rng(seed)
    transitions = np.full((VOCAB, VOCAB), 0.1 / (VOCAB - 2))
    for token in range(VOCAB):
        first, second = rng.choice(VOCAB, size=2, replace=False)
        transitions[token, [first, second]] = (0.7, 0.2)
    transitions /= transitions.sum(1, keepdims=True)
    tokens = np.empty((steps * batch, length + 1), np.int64)
    tokens[:, 0] = rng.integers(VOCAB, size=steps * batch)
    for t in range(length):
        cumulative = transitions[tokens[:, t]].cumsum(1)
        tokens[:, t + 1] = (rng.random((steps * batch, 1)) < cumulative).argmax(1)
    return tokens.reshape(steps, batch, length + 1)


@dataclass
class TwinRun:
    """Losses per step in both frameworks and the tokens each generated."""

    mechanism: str
    dtype: str
    torch_losses: np.ndarray
    flax_losses: np.ndarray
    torch_tokens: np.ndarray
    flax_tokens: np.ndarray

    @property
    def max_loss_difference(self) -> float:
        return float(np.abs(self.torch_losses - self.flax_losses).max())


def run(
    mechanism: str,
    *,
    steps: int = 100,
    dtype: str = "float64",
    batch: int = 8,
    length: int = 32,
    generate: int = 12,
    seed: int = 0,
) -> TwinRun:
    """Train both twins for ``steps`` AdamW steps in ``dtype`` and generate ``generate``
    tokens from the first 8 tokens of 4 held-out sequences."""
    data = markov_batches(steps + 1, batch, length, seed=seed)
    torch.manual_seed(seed)
    model = twin_lm_torch.TwinLM(mechanism, vocab=VOCAB).to(getattr(torch, dtype))
    flax_model = twin_lm_flax.TwinLM(mechanism, vocab=VOCAB)
    with jax.enable_x64(dtype == "float64"):
        params = parity.torch_to_flax(model)

        optimizer = torch.optim.AdamW(model.parameters(), **HYPER)
        torch_losses = []
        for tokens in torch.from_numpy(data[:steps]):
            optimizer.zero_grad()
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            torch_losses.append(loss.item())

        tx = optax.adamw(
            HYPER["lr"],
            b1=HYPER["betas"][0],
            b2=HYPER["betas"][1],
            eps=HYPER["eps"],
            weight_decay=HYPER["weight_decay"],
        )

        def loss_of(params, tokens):
            logits = flax_model.apply({"params": params}, tokens[:, :-1])
            targets = tokens[:, 1:]
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        @jax.jit
        def step(params, state, tokens):
            loss, grads = jax.value_and_grad(loss_of)(params, tokens)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        state = tx.init(params)
        flax_losses = []
        for tokens in data[:steps]:
            params, state, loss = step(params, state, jnp.asarray(tokens))
            flax_losses.append(float(loss))

        prompt = data[steps, :4, :8]
        model.eval()
        torch_tokens = model.generate(torch.from_numpy(prompt), generate).numpy()
        flax_tokens = np.asarray(
            twin_lm_flax.generate(flax_model, params, jnp.asarray(prompt), generate)
        )
    return TwinRun(
        mechanism,
        dtype,
        np.asarray(torch_losses),
        np.asarray(flax_losses),
        torch_tokens,
        flax_tokens,
    )


def plot(runs: list[TwinRun], path: str) -> None:
    """Loss curves of both frameworks (top) and their difference (bottom, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for run_ in runs:
        label = f"{run_.mechanism}, {run_.dtype}"
        steps = np.arange(1, len(run_.torch_losses) + 1)
        top.plot(steps, run_.torch_losses, label=f"PyTorch ({label})")
        top.plot(steps, run_.flax_losses, "--", label=f"JAX ({label})")
        difference = np.abs(run_.torch_losses - run_.flax_losses)
        bottom.semilogy(steps, np.maximum(difference, 1e-17), label=label)
    top.set_ylabel("cross-entropy")
    top.legend(fontsize=7)
    bottom.set_ylabel("|loss PyTorch - loss JAX|")
    bottom.set_xlabel("AdamW step")
    bottom.legend(fontsize=7)
    figure.suptitle("TwinLM trained side by side from the same weights")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.twin_lm", description=__doc__)
    parser.add_argument("--mechanism", action="append", help="default: local; repeatable")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--dtype", action="append", choices=("float64", "float32"))
    parser.add_argument("--plot", help="save the loss curves here (PNG)")
    args = parser.parse_args(argv)
    runs = []
    for mechanism in args.mechanism or ["local"]:
        for dtype in args.dtype or ["float64", "float32"]:
            result = run(mechanism, steps=args.steps, dtype=dtype)
            runs.append(result)
            same = np.array_equal(result.torch_tokens, result.flax_tokens)
            print(
                f"{mechanism:<11} {dtype:<8} loss {result.torch_losses[0]:.4f} -> "
                f"{result.torch_losses[-1]:.4f}, max |difference| over {args.steps} steps "
                f"{result.max_loss_difference:.1e}, greedy tokens "
                f"{'identical' if same else 'DIFFER'}"
            )
    if args.plot:
        plot(runs, args.plot)
        print(f"saved {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
