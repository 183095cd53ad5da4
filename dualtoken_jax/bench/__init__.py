"""Benchmarks: `python -m dualtoken_jax.bench --help`."""
