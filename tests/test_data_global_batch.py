"""Host batches -> global arrays over ('data', 'fsdp') on 8 simulated CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from dualtoken_jax.data import global_batch
from dualtoken_jax.data import pipeline
from dualtoken_jax.data import sample_photos


@pytest.fixture(scope="module")
def mesh():
  if len(jax.devices()) < 8:
    pytest.skip("needs the 8 simulated devices set up by tests/conftest.py")
  return jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4, 1),
                           ("data", "fsdp", "tensor"))


def test_global_array_is_sharded_over_data_and_fsdp(mesh):
  local = np.arange(16 * 2 * 3, dtype=np.float32).reshape(16, 2, 3)
  arr = global_batch.make_global_array(local, mesh)
  assert arr.shape == (16, 2, 3)
  assert arr.sharding.spec == PartitionSpec(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(arr), local)
  # Device (d, f) of the mesh holds rows 2 * (4 * d + f) and the next one.
  for shard in arr.addressable_shards:
    (d, f, _), = zip(*np.nonzero(mesh.devices == shard.device))
    first = 2 * (4 * d + f)
    np.testing.assert_array_equal(np.asarray(shard.data), local[first:first + 2])


def test_batch_size_checks_explain_what_would_work(mesh):
  assert global_batch.num_batch_shards(mesh) == (8, 8)
  assert global_batch.host_batch_size(256, mesh) == 256  # One process holds everything.
  with pytest.raises(ValueError, match=r"global batch size 12 .* multiple of the 8 batch "
                                       r"shards .*\('data', 'fsdp'\).*\(2, 4\).*e\.g\. 16"):
    global_batch.host_batch_size(12, mesh)
  with pytest.raises(ValueError, match=r"per-host batch of 12 rows .* multiple of 8"):
    global_batch.make_global_array(np.zeros((12, 3)), mesh)
  data_only = jax.sharding.Mesh(mesh.devices.reshape(8), ("data",))
  with pytest.raises(ValueError, match=r"lack the batch axes \['fsdp'\]"):
    global_batch.make_global_array(np.zeros((8, 3)), data_only)
  assert global_batch.make_global_array(np.zeros((8, 3)), data_only, axes=("data",)).shape == (
      8, 3)


def test_a_pipeline_batch_becomes_global_arrays(mesh):
  src = sample_photos.SamplePhotosSource()
  ds = pipeline.make_eval_dataset(src, batch_size=8, resolution=16, shard_index=0,
                                  shard_count=1)
  batch = next(iter(ds))
  arrays = global_batch.make_global_batch(batch, mesh)
  assert set(arrays) == {"image", "mask"}  # Keys and skip counters stay on the host.
  assert arrays["image"].shape == (8, 16, 16, 3) and arrays["image"].dtype == np.float32
  assert arrays["mask"].dtype == np.bool_
  np.testing.assert_array_equal(np.asarray(arrays["image"]), batch["image"])
  total = jax.jit(lambda x, m: (x.sum(axis=(1, 2, 3)) * m).sum())(arrays["image"],
                                                                   arrays["mask"])
  np.testing.assert_allclose(total, (batch["image"].sum(axis=(1, 2, 3)) * batch["mask"]).sum(),
                             rtol=1e-5)
