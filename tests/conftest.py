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

# The longest test files first: `-n 2 --dist loadfile` hands whole files to the two workers in
# collection order, so starting the long ones early keeps one worker from finishing minutes
# before the other (measured: test_multiprocess.py alone takes ~8 minutes).
LONGEST_FIRST = ("test_multiprocess.py", "test_mllm_demo.py", "test_training_resume.py",
                 "test_training_step.py", "test_app.py", "test_bench_smoke.py",
                 "test_tokenizer_api.py", "test_pixel_loss.py", "test_mllm_step.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
