"""The fused nearest-code kernel (`quantization/pallas_nearest.py`), run in the Pallas interpreter
on CPU, returns exactly `residual.nearest_code`'s indices: random inputs, duplicated codebook
rows and exactly equal distances (ties to the lowest index, within and across codebook tiles),
with N and K not multiples of the blocks. Shapes are tiny: the interpreter is slow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualtoken_jax.quantization import pallas_nearest as PN
from dualtoken_jax.quantization import residual as rvq
from dualtoken_jax.quantization.quantizer import ResidualQuantizer

BLOCKS = dict(block_n=32, block_k=128)  # 3 codebook tiles at K=300, 2 vector blocks at N=50


def kernel(x, codebook):
  return np.asarray(PN.nearest_code_pallas(x, codebook, interpret=True, **BLOCKS))


def test_random_inputs_match_the_xla_search():
  x = jax.random.normal(jax.random.key(0), (50, 8))
  codebook = jax.random.normal(jax.random.key(1), (300, 8))
  expected = np.asarray(rvq.nearest_code(x, codebook, chunk=100))
  np.testing.assert_array_equal(kernel(x, codebook), expected)
  brute = np.argmin(((np.asarray(x)[:, None] - np.asarray(codebook)[None]) ** 2).sum(-1), 1)
  assert (expected == brute).mean() > 0.95  # a sanity check of the inputs, not of the kernel


def test_duplicated_rows_and_equal_distances_go_to_the_lowest_index():
  rng = np.random.default_rng(0)
  codebook = rng.integers(-4, 5, (300, 8)).astype(np.float32)
  codebook[[140, 290]] = codebook[7]          # duplicates in later tiles: index 7 must win
  codebook[[200, 250]] = codebook[130]        # duplicates within and across tiles: 130
  x = np.concatenate([
      codebook[[7, 140, 290, 130, 200, 250]],  # exact hits on duplicated rows
      codebook[[7]] + 0.25,                    # near a duplicated row
      np.zeros((1, 8), np.float32),            # integer codebook: many exactly equal distances
      rng.integers(-4, 5, (40, 8)).astype(np.float32) + 0.5,  # integer + 1/2: ties everywhere
  ]).astype(np.float32)
  dist = ((x[:, None].astype(np.float64) - codebook[None]) ** 2).sum(-1)
  lowest = np.argmin(dist, axis=1)  # numpy: the first index attaining the minimum
  assert lowest[0] == lowest[1] == lowest[2] == 7 and lowest[3] == lowest[4] == lowest[5] == 130
  assert (np.sum(dist == dist.min(1, keepdims=True), axis=1) > 1).sum() >= 10  # real ties
  np.testing.assert_array_equal(np.asarray(rvq.nearest_code(jnp.asarray(x), jnp.asarray(codebook),
                                                            chunk=64)), lowest)
  np.testing.assert_array_equal(kernel(jnp.asarray(x), jnp.asarray(codebook)), lowest)
  # A table of identical rows: every vector takes index 0.
  same = np.broadcast_to(codebook[:1], (300, 8))
  np.testing.assert_array_equal(kernel(jnp.asarray(x), jnp.asarray(same)), 0)


def test_quantizer_selects_the_kernel_by_config():
  z = jax.random.normal(jax.random.key(3), (40, 8))
  make = lambda impl: ResidualQuantizer(codebook_size=200, embed_dim=8, depth=2,
                                        distance_chunk=64, nearest_code_impl=impl,
                                        pallas_interpret=True)
  stats = make("xla").init(jax.random.key(1), z)
  xla = make("xla").apply(stats, z).codes
  np.testing.assert_array_equal(make("pallas").apply(stats, z).codes, xla)
  if jax.default_backend() not in PN.ACCELERATORS:
    assert PN.resolve("auto") == "xla"
    with pytest.raises(ValueError, match="nearest_code_impl='pallas' needs a GPU or TPU"):
      PN.search(z, stats["vq_stats"]["codebook"], impl="pallas")
  with pytest.raises(ValueError, match=r"nearest_code_impl must be one of"):
    PN.resolve("triton")
