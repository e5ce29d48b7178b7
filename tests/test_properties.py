"""Property tests: random configurations and inputs against the float64 reference, and parity.

Every example draws a configuration of one registry row (``parity.mechanisms``): H query
heads (1..6) and, for grouped attention, K kv heads dividing H (MQA K = 1 to K = H), the
head width, temperature, window, block, rate, feature map, RoPE on or off with either
layout and base, biases and input width; then a batch, a length (1, primes, and lengths
that are not multiples of the window/block/rate), a keep-mask of any accepted shape (bool
or 0/1 float) and ``is_causal``. It checks in float64 that both frameworks, weights path
and fast path, equal the NumPy reference of tests/reference.py, which shares no code with
the packages (so a bug planted identically in both still fails), and that PyTorch and
Flax agree on every gradient.

The configurations come from the registry: a new row is tested here without a change,
and a row whose pattern or constructor argument has no strategy below fails loudly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from parity.mechanisms import MECHANISMS, Mechanism
from tests import helpers

QUICK_EXAMPLES = 5
"""Examples per mechanism in ``test_random_configurations`` (part of the quick run)."""
MORE_EXAMPLES = 20
"""Further examples per mechanism in ``test_more_random_configurations`` (``slow``)."""
SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    # no shrinking: every example compiles anew, so shrinking a failure would take minutes;
    # the failing example is reported as drawn (small already: L <= 17, H <= 6)
    "phases": [Phase.explicit, Phase.generate],
    "suppress_health_check": [HealthCheck.too_slow],
}
LENGTHS = st.sampled_from([1, 2, 3, 5, 7, 8, 11, 13, 16, 17])

PATTERN_OPTIONS = {
    "dense": {},
    "alibi": {},
    "rope": {},  # RoPE on (for every pattern that may take it), and rope_base, in configs()
    "local": {"window_size": st.integers(1, 9)},
    "dilated": {"dilation_rate": st.integers(1, 5)},
    "block": {"block_size": st.integers(1, 7)},
    "linear": {"feature_map": st.sampled_from(["elu", "relu"])},
}
"""The constructor arguments each pattern adds, with their strategies."""

HEAD_ARGUMENTS = {"num_heads", "num_query_heads", "num_kv_heads"}
"""Head counts: drawn here for the rows that name them (H in 1..6, K dividing H)."""


@st.composite
def configs(draw, mechanism: Mechanism) -> dict:
    """Whole constructor arguments of ``mechanism``'s class, drawn at random."""
    if mechanism.pattern not in PATTERN_OPTIONS:
        raise AssertionError(
            f"registry row {mechanism.name!r} has pattern {mechanism.pattern!r}, which has no "
            "strategy in tests/test_properties.py PATTERN_OPTIONS: add one"
        )
    extra = PATTERN_OPTIONS[mechanism.pattern]
    unknown = set(mechanism.kwargs) - {"d_model", "input_dim", *HEAD_ARGUMENTS, *extra}
    if unknown:
        raise AssertionError(
            f"registry row {mechanism.name!r} takes {sorted(unknown)}, which have no strategy "
            "in tests/test_properties.py: add them"
        )
    # the rotary class has RoPE on by default: draw it for the others
    rope = mechanism.pattern == "rope" or draw(st.booleans(), label="rope")
    heads = draw(st.integers(1, 6), label="H") if HEAD_ARGUMENTS & set(mechanism.kwargs) else 1
    d_head = draw(st.sampled_from([2, 4] if rope else [1, 2, 3, 4]), label="d_head")
    config = {"d_model": heads * d_head, **draw(st.fixed_dictionaries(extra), label="pattern")}
    if "num_kv_heads" in mechanism.kwargs:
        divisors = [k for k in range(1, heads + 1) if heads % k == 0]
        config["num_query_heads"] = heads
        config["num_kv_heads"] = draw(st.sampled_from(divisors), label="K")
    elif "num_heads" in mechanism.kwargs:
        config["num_heads"] = heads
    if rope:
        config["rope"] = True
        config["rope_interleaved"] = draw(st.booleans(), label="rope_interleaved")
        config["rope_base"] = draw(st.sampled_from([10000.0, 500.0]), label="rope_base")
    if mechanism.softmax:
        temperatures = st.one_of(st.just(1.0), st.floats(0.25, 4.0))
        config["temperature"] = draw(temperatures, label="temperature")
    config["bias"] = draw(st.booleans(), label="bias")
    config["input_dim"] = draw(st.sampled_from([None, 3]), label="input_dim")
    return config


def _check_example(mechanism: Mechanism, data) -> None:
    """Draw one example of ``mechanism`` and check it against the reference and for parity."""
    config = data.draw(configs(mechanism), label="config")
    batch, length = data.draw(st.integers(1, 2), label="B"), data.draw(LENGTHS, label="L")
    mask_kind = data.draw(st.sampled_from(helpers.MASK_KINDS), label="mask")
    is_causal = data.draw(st.booleans(), label="is_causal")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    heads, _ = mechanism.head_counts(config)
    mask = helpers.user_mask(mask_kind, rng, batch, length, heads)
    if mask is not None and data.draw(st.booleans(), label="0/1 float mask"):
        mask = mask.astype(np.float64)
    x = rng.standard_normal((batch, length, helpers.input_width(mechanism, config)))

    torch.manual_seed(0)
    helpers.check_reference(mechanism, config, x, mask, is_causal, atol=1e-10)
    # jit: one compilation per example beats eager dispatch compiling each op for new shapes
    helpers.check_parity(
        *helpers.make_layers(mechanism, config),
        x,
        mask,
        is_causal=is_causal,
        dtype="float64",
        jit=True,
    )


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
@settings(max_examples=QUICK_EXAMPLES, **SETTINGS)
@given(data=st.data())
def test_random_configurations(mechanism, data):
    _check_example(mechanism, data)


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
@settings(max_examples=MORE_EXAMPLES, **SETTINGS)
@given(data=st.data())
def test_more_random_configurations(mechanism, data):
    """Other examples than the quick test's (hypothesis derives them from the test's name)."""
    _check_example(mechanism, data)
