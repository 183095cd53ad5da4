"""Test setup: 8 simulated CPU devices (for mesh tests) and shared fixtures' location."""

import os
import pathlib

# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
