"""Test setup: 8 simulated CPU devices (mesh tests), a shared XLA compilation cache, fixtures.

The persistent compilation cache lets tests (and the training subprocesses some of them start)
reuse executables compiled by earlier tests for identical programs: on CPU, compiling a full
training step costs far more than running it.
"""

import atexit
import os
import pathlib
import shutil
import tempfile

# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="dualtoken_jax_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

