"""Residual quantiser maths, EMA updates, restarts, and data-parallel equivalence.

The numpy references below follow the PyTorch reference's algorithm literally (full distance
matrix, one-hot statistics), so the JAX versions (chunked distances, segment sums) are checked
against an independent implementation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dualtoken_jax.quantization import codebook_ema
from dualtoken_jax.quantization import residual as rvq
from dualtoken_jax.quantization.quantizer import ResidualQuantizer


def np_nearest(x, codebook):
  d = (x**2).sum(1, keepdims=True) + (codebook**2).sum(1)[None] - 2 * x @ codebook.T
  return d.argmin(1)


def _fresh_ema_state(codebook):
  """The quantiser's initial `vq_stats`: zero counts, sums equal to the table."""
  codebook = jnp.asarray(codebook, jnp.float32)
  return dict(codebook=codebook, cluster_size=jnp.zeros(codebook.shape[:1], jnp.float32),
              embed_sum=codebook)


def np_ema(state, vectors, codes, decay=0.99, eps=1e-5):
  k = state["cluster_size"].shape[0]
  one_hot = np.zeros((k, len(codes)), np.float64)
  one_hot[codes, np.arange(len(codes))] = 1
  n = decay * state["cluster_size"] + (1 - decay) * one_hot.sum(1)
  s = decay * state["embed_sum"] + (1 - decay) * one_hot @ vectors
  total = n.sum()
  table = s / (total * (n + eps) / (total + k * eps))[:, None]
  return dict(codebook=table, cluster_size=n, embed_sum=s)


@pytest.mark.parametrize("n,k,chunk", [(300, 1000, 128), (64, 48, 2048), (500, 513, 64)])
def test_nearest_code_chunked_equals_brute_force(n, k, chunk):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 8)).astype(np.float32)
  codebook = rng.normal(size=(k, 8)).astype(np.float32)
  np.testing.assert_array_equal(rvq.nearest_code(x, codebook, chunk), np_nearest(x, codebook))


def test_nearest_code_ties_go_to_lowest_index_across_chunks():
  codebook = np.zeros((10, 4), np.float32)
  codebook[3] = codebook[7] = 1.0  # rows 3 and 7 are identical; 3 lives in chunk 0, 7 in chunk 1
  x = np.ones((5, 4), np.float32)
  np.testing.assert_array_equal(rvq.nearest_code(x, codebook, chunk=5), [3] * 5)


def test_chunked_distances_bound_peak_memory():
  n, k, d, chunk = 4096, 16384, 32, 1024
  compiled = jax.jit(functools.partial(rvq.nearest_code, chunk=chunk)).lower(
      jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((k, d), jnp.float32)).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  full_matrix = n * k * 4
  assert temp < full_matrix / 4, f"temp {temp} bytes: the N x K distance matrix is materialised"


def test_residual_quantize_matches_numpy_reference():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(200, 8)).astype(np.float32)
  codebook = rng.normal(size=(64, 8)).astype(np.float32)
  result = rvq.residual_quantize(z, codebook, depth=4, chunk=16)
  r, total = z.copy(), np.zeros_like(z)
  for level in range(4):
    idx = np_nearest(r, codebook)
    np.testing.assert_array_equal(result.codes[:, level], idx)
    np.testing.assert_allclose(result.level_inputs[level], r, atol=1e-6)
    r, total = r - codebook[idx], total + codebook[idx]
    np.testing.assert_allclose(result.partial_sums[level], total, atol=1e-6)
  np.testing.assert_allclose(rvq.embed_codes(result.codes, codebook).sum(-2), total, atol=1e-6)


def test_straight_through_and_commitment_gradients():
  rng = np.random.default_rng(2)
  z = jnp.asarray(rng.normal(size=(50, 8)).astype(np.float32))
  codebook = jnp.asarray(rng.normal(size=(32, 8)).astype(np.float32))

  def forward(z):
    result = rvq.residual_quantize(z, codebook, depth=3)
    return rvq.straight_through(z, result.partial_sums[-1]), rvq.commitment_loss(z, result.partial_sums)

  zq, loss = forward(z)
  result = rvq.residual_quantize(z, codebook, depth=3)
  np.testing.assert_allclose(zq, result.partial_sums[-1], atol=1e-6)
  expected_loss = np.mean([np.mean((z - result.partial_sums[d]) ** 2) for d in range(3)])
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda z: forward(z)[0].sum())(z), np.ones_like(z))
  grad_loss = jax.grad(lambda z: forward(z)[1])(z)
  expected = sum(2 * (z - result.partial_sums[d]) for d in range(3)) / (3 * z.size)
  np.testing.assert_allclose(grad_loss, expected, rtol=1e-5, atol=1e-8)


def test_ema_step_matches_one_hot_reference():
  rng = np.random.default_rng(3)
  state = _fresh_ema_state(rng.normal(size=(40, 8)).astype(np.float32))
  state["cluster_size"] = rng.uniform(0, 3, size=40).astype(np.float32)
  vectors = rng.normal(size=(300, 8)).astype(np.float32)
  codes = rng.integers(0, 40, size=300)
  got = codebook_ema.ema_step(state, vectors, codes, decay=0.99, eps=1e-5, restart_key=None)
  want = np_ema({k: np.asarray(v, np.float64) for k, v in state.items()}, vectors, codes)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_restart_replaces_only_dead_codes_with_batch_vectors():
  rng = np.random.default_rng(4)
  k = 64
  state = _fresh_ema_state(rng.normal(size=(k, 4)).astype(np.float32))
  state["cluster_size"] = jnp.where(jnp.arange(k) < 32, 5.0, 0.0)  # codes 32.. are dead
  vectors = rng.normal(size=(20, 4)).astype(np.float32)  # fewer vectors than codes: tiled + jitter
  codes = np.zeros(20, np.int32)
  new = codebook_ema.ema_step(state, vectors, codes, decay=0.99, eps=1e-5,
                              restart_key=jax.random.key(0))
  dead = np.arange(k) >= 32
  np.testing.assert_allclose(new["cluster_size"][dead], 1.0)
  # Restarted sums are batch vectors plus jitter in [0, 0.01/sqrt(d)).
  for row in np.asarray(new["embed_sum"])[dead]:
    diff = row[None] - vectors
    assert np.any(np.all((diff >= 0) & (diff < 0.01 / 2), axis=1)), row
  alive = ~dead
  expected = np_ema({k_: np.asarray(v, np.float64) for k_, v in state.items()}, vectors, codes)
  np.testing.assert_allclose(new["embed_sum"][alive], expected["embed_sum"][alive], rtol=1e-5, atol=1e-6)
  assert not np.allclose(new["embed_sum"][dead], state["embed_sum"][dead])


def quantizer(**kw):
  args = dict(codebook_size=64, embed_dim=8, depth=3, distance_chunk=16)
  args.update(kw)
  return ResidualQuantizer(**args)


def test_per_level_and_pooled_updates_differ_as_specified():
  rng = np.random.default_rng(5)
  z = jnp.asarray(rng.normal(size=(4, 6, 6, 8)).astype(np.float32))
  stats = quantizer().init(jax.random.key(0), z)["vq_stats"]
  flat = np.asarray(z).reshape(-1, 8)
  np_state = {k: np.asarray(v, np.float64) for k, v in stats.items()}

  # pooled: all levels search the initial table, then one EMA step over the pooled pairs.
  _, pooled = quantizer(ema_update="pooled", restart_unused_codes=False).apply(
      {"vq_stats": stats}, z, train=True, mutable=["vq_stats"])
  result = rvq.residual_quantize(flat, stats["codebook"], 3)
  want = np_ema(np_state, np.asarray(result.level_inputs).reshape(-1, 8), np.asarray(result.codes).T.reshape(-1))
  np.testing.assert_allclose(pooled["vq_stats"]["codebook"], want["codebook"], rtol=1e-4, atol=1e-5)

  # per level: three EMA steps, each level searching the table the previous one wrote.
  out, per_level = quantizer(ema_update="per_level", restart_unused_codes=False).apply(
      {"vq_stats": stats}, z, train=True, mutable=["vq_stats"])
  state, r = np_state, flat.astype(np.float64)
  for level in range(3):
    idx = np_nearest(r, state["codebook"])
    np.testing.assert_array_equal(np.asarray(out.codes).reshape(-1, 3)[:, level], idx)
    q = state["codebook"][idx]
    state = np_ema(state, r, idx)
    r = r - q
  np.testing.assert_allclose(per_level["vq_stats"]["codebook"], state["codebook"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(per_level["vq_stats"]["cluster_size"], state["cluster_size"], rtol=1e-5)

  # The reference's aliasing bug (kept behind a switch) pools the final residual for every level.
  _, buggy = quantizer(ema_update="pooled", restart_unused_codes=False, reference_aliasing_bug=True).apply(
      {"vq_stats": stats}, z, train=True, mutable=["vq_stats"])
  final = np.tile(np.asarray(result.final_residual), (3, 1))
  want_bug = np_ema(np_state, final, np.asarray(result.codes).T.reshape(-1))
  np.testing.assert_allclose(buggy["vq_stats"]["embed_sum"], want_bug["embed_sum"], rtol=1e-4, atol=1e-5)
  assert not np.allclose(buggy["vq_stats"]["embed_sum"], pooled["vq_stats"]["embed_sum"])


def test_eval_mode_changes_nothing_and_training_needs_mutable():
  z = jnp.ones((1, 2, 2, 8))
  q = quantizer()
  variables = q.init(jax.random.key(0), z)
  out, new = q.apply(variables, z, train=False, mutable=["vq_stats"])
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(variables["vq_stats"])):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="mutable"):
    q.apply(variables, z, train=True)
  with pytest.raises(ValueError, match="size 8"):
    q.apply(variables, jnp.ones((1, 2, 2, 5)))


def test_data_parallel_update_equals_single_device():
  """Under jit with the batch sharded over 8 devices, the EMA statistics (and the restart
  vectors, drawn from the global batch with a shared key) equal the single-device step, and
  the shard_map path with an explicit psum/all_gather axis agrees too."""
  rng = np.random.default_rng(6)
  z = rng.normal(size=(16, 3, 3, 8)).astype(np.float32)
  q = quantizer(codebook_size=256)  # more codes than vectors used: restarts happen
  variables = q.init(jax.random.key(0), jnp.asarray(z))

  def step(variables, z, key):
    out, new = q.apply(variables, z, train=True, mutable=["vq_stats"], rngs={"vq": key})
    return out.codes, new["vq_stats"]

  key = jax.random.key(42)
  codes1, stats1 = jax.jit(step)(variables, jnp.asarray(z), key)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(8, 1, 1), ("data", "fsdp", "tensor"))
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  replicated = NamedSharding(mesh, P())
  codes8, stats8 = jax.jit(step, in_shardings=(replicated, batch, replicated),
                           out_shardings=(batch, replicated))(variables, jax.device_put(z, batch), key)
  np.testing.assert_array_equal(codes8, codes1)
  for name in ("codebook", "cluster_size", "embed_sum"):
    np.testing.assert_allclose(stats8[name], stats1[name], rtol=1e-5, atol=1e-6, err_msg=name)
  assert np.sum(np.asarray(stats1["cluster_size"]) == 1.0) > 0  # some codes were restarted

  # shard_map: each device sees its own slice; psum / all_gather make the update global.
  q_axis = quantizer(codebook_size=256, axis_name="data")
  sharded_step = jax.shard_map(
      lambda v, z, k: q_axis.apply(v, z, train=True, mutable=["vq_stats"], rngs={"vq": k})[1]["vq_stats"],
      mesh=mesh, in_specs=(P(), P("data"), P()), out_specs=P(), check_vma=False)
  stats_sm = jax.jit(sharded_step)(variables, jnp.asarray(z), key)
  # Restart candidates are drawn from the all-gathered batch in the same order as above.
  for name in ("codebook", "cluster_size", "embed_sum"):
    np.testing.assert_allclose(stats_sm[name], stats1[name], rtol=1e-5, atol=1e-6, err_msg=name)
