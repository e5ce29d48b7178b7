"""Runnable examples; ``twin_lm`` is one model written in both frameworks."""
