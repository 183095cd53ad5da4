"""Grain pipelines: host sharding, epochs, exact resume (incl. Orbax), skip accounting, eval
padding. Images are flat colours that encode their source index, so a batch can be read back
as the list of records it came from."""

import io
import json
import os

import grain
import numpy as np
import pytest
from PIL import Image

from dualtoken_jax.data import pipeline
from dualtoken_jax.data import records
from dualtoken_jax.data import sources

RES = 8
NO_SKIPS = dict.fromkeys(records.SKIP_REASONS, 0)


class _ListSource:
  """In-memory records; remembers which indices were read."""

  def __init__(self, recs):
    self._recs = recs
    self.reads = []

  def __len__(self):
    return len(self._recs)

  def __getitem__(self, index):
    self.reads.append(int(index))
    rec = self._recs[index]
    if isinstance(rec, Exception):
      raise rec
    return dict(rec)


def _colour_source(n, bad=None):
  """Record i is a flat image of value 8 * i; `bad` maps an index to a replacement record."""
  bad = bad or {}
  recs = []
  for i in range(n):
    recs.append(bad.get(i, {"key": f"{i:03d}", "image": np.full((12, 10, 3), 8 * i, np.uint8)}))
  return _ListSource(recs)


def _ids(images):
  """Source indices of a batch of flat-colour images."""
  return np.rint((np.asarray(images)[:, 0, 0, 0] + 1) * 127.5 / 8).astype(int).tolist()


def _train(source, **kw):
  kw = {"batch_size": 4, "resolution": RES, "seed": 0, "shard_index": 0, "shard_count": 1,
        **kw}
  return pipeline.make_train_dataset(source, **kw)


def _add(total, counts):
  return {r: total[r] + counts[r] for r in records.SKIP_REASONS}


def test_hosts_partition_every_epoch_and_epochs_reshuffle():
  n, hosts, epochs = 24, 2, 2
  per_host = []
  for host in range(hosts):
    src = _colour_source(n)
    batches = list(_train(src, num_epochs=epochs, shard_index=host, shard_count=hosts))
    assert all(b["image"].shape == (4, RES, RES, 3) for b in batches)
    ids = [i for b in batches for i in _ids(b["image"])]
    assert len(ids) == n * epochs // hosts
    per_host.append(ids)
    # Each host reads only the records it trains on.
    assert sorted(src.reads) == sorted(ids)
  for epoch in range(epochs):
    shares = [set(ids[epoch * n // hosts:(epoch + 1) * n // hosts]) for ids in per_host]
    assert shares[0].isdisjoint(shares[1])
    assert shares[0] | shares[1] == set(range(n))

  stream = [i for b in _train(_colour_source(n), num_epochs=2) for i in _ids(b["image"])]
  assert sorted(stream[:n]) == sorted(stream[n:]) == list(range(n))
  assert stream[:n] != stream[n:]  # Reshuffled per epoch...
  assert stream[:n] != list(range(n))  # ...and shuffled at all.
  again = [i for b in _train(_colour_source(n), num_epochs=2) for i in _ids(b["image"])]
  other_seed = [i for b in _train(_colour_source(n), num_epochs=2, seed=1)
                for i in _ids(b["image"])]
  assert again == stream and other_seed != stream


def test_crops_depend_on_the_stream_position_not_the_host_count():
  """Two hosts with a per-host batch of 4 read, between them, the records and crops one host
  reads: host 0 records 0-3, 8-11, ..., host 1 records 4-7, 12-15, ..."""
  rng = np.random.default_rng(0)
  recs = [{"key": str(i), "image": rng.integers(0, 256, (40, 30, 3), np.uint8)}
          for i in range(8)]
  one_host = np.concatenate([b["image"] for b in _train(_ListSource(recs), num_epochs=1)])
  two_hosts = [np.concatenate([b["image"] for b in _train(_ListSource(recs), num_epochs=1,
                                                          shard_index=h, shard_count=2)])
               for h in range(2)]
  # Host h reads the h-th block of `batch_size` records of every turn (`HostBlocks`).
  blocks = one_host.reshape(-1, 4, *one_host.shape[1:])
  np.testing.assert_array_equal(np.concatenate(blocks[0::2]), two_hosts[0])
  np.testing.assert_array_equal(np.concatenate(blocks[1::2]), two_hosts[1])


def _bad_records():
  return {3: {"key": "empty", "image_bytes": b""},
          4: {"key": "junk", "image_bytes": b"\x89PNG not really"},
          9: records.skip_record("bad_member", "../evil.jpg"),
          10: FileNotFoundError("gone"),
          17: OSError("disk on fire")}


@pytest.mark.parametrize("options", [{}, {"num_threads": 3}, {"prefetch_batches": 2}])
def test_resume_from_a_saved_state_reproduces_the_uninterrupted_run(options):
  n, k, m = 20, 4, 7  # Save after k batches, then compare m more (crosses epochs).
  ds = _train(_colour_source(n, _bad_records()), batch_size=3, **options)
  it = iter(ds)
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # What a checkpoint stores.
  expected = [next(it) for _ in range(m)]
  expected_total = it.skipped_total

  resumed = iter(_train(_colour_source(n, _bad_records()), batch_size=3, **options))
  resumed.set_state(state)
  got = [next(resumed) for _ in range(m)]
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(e["image"], g["image"])
    assert e["skipped"] == g["skipped"]
  assert resumed.skipped_total == expected_total
  assert sum(v for v in expected_total.values()) > 0
  if options:  # Threads and prefetching change nothing but speed.
    inline = iter(_train(_colour_source(n, _bad_records()), batch_size=3))
    first = [next(inline) for _ in range(k + m)][k:]
    for e, f in zip(expected, first):
      np.testing.assert_array_equal(e["image"], f["image"])


def test_orbax_checkpoint_of_the_iterator(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  if not hasattr(grain.checkpoint, "CheckpointSave"):
    pytest.skip("this grain build has no Orbax checkpoint args")
  it = iter(_train(_colour_source(16, _bad_records()), batch_size=2))
  for _ in range(5):
    next(it)
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
    mngr.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = [next(it) for _ in range(6)]

  fresh = iter(_train(_colour_source(16, _bad_records()), batch_size=2))
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
    mngr.restore(5, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  for e in expected:
    g = next(fresh)
    np.testing.assert_array_equal(e["image"], g["image"])
  assert fresh.skipped_total == it.skipped_total


def _write_folder(root, good):
  root.mkdir()
  for i in range(good):
    Image.fromarray(np.full((12, 10, 3), 8 * i, np.uint8)).save(root / f"good{i:02d}.png")
  jpeg = io.BytesIO()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(jpeg, "JPEG")
  (root / "empty.png").write_bytes(b"")
  (root / "truncated.jpg").write_bytes(jpeg.getvalue()[:200])
  (root / "random.jpg").write_bytes(np.random.default_rng(0).bytes(500))
  (root / "deleted.png").write_bytes((root / "good00.png").read_bytes())


def test_bad_files_are_skipped_and_counted_in_training(tmp_path):
  _write_folder(tmp_path / "imgs", good=7)
  src = sources.ImageFolderSource(tmp_path / "imgs")
  os.remove(tmp_path / "imgs" / "deleted.png")  # Gone between indexing and reading.
  before = sorted(os.listdir(tmp_path))

  it = iter(_train(src, batch_size=3, num_epochs=2))
  batches = list(it)
  # 2 epochs x 7 good images = 14 -> 4 full batches of 3; the remainder is dropped.
  assert len(batches) == 4
  ids = [i for b in batches for i in _ids(b["image"])]
  assert set(ids) <= set(range(7))
  per_epoch = {"missing": 1, "read_error": 0, "empty": 1, "decode_error": 2, "too_large": 0,
               "bad_member": 0, "not_a_file": 0}
  assert it.skipped_total == {r: 2 * c for r, c in per_epoch.items()}
  # Every skip reached the consumer exactly once: in a batch, or in the dropped remainder.
  reported = NO_SKIPS
  for b in batches:
    reported = _add(reported, b["skipped"])
  assert all(reported[r] <= it.skipped_total[r] for r in records.SKIP_REASONS)
  assert sorted(os.listdir(tmp_path)) == before


def test_a_source_of_only_bad_records_fails_loudly_instead_of_spinning():
  src = _ListSource([{"key": str(i), "image_bytes": b"nope"} for i in range(4)])
  with pytest.raises(RuntimeError, match=r"10 records in a row.*decode_error.*image_key"):
    next(iter(_train(src, max_consecutive_skips=10)))


@pytest.mark.parametrize("n,hosts,batch", [(10, 2, 3), (7, 3, 2), (1, 2, 4), (12, 2, 3)])
def test_eval_covers_every_image_exactly_once_across_hosts(n, hosts, batch):
  bad = {1: {"key": "001", "image_bytes": b""}, 5: FileNotFoundError("gone")}
  seen, totals, num_batches = [], NO_SKIPS, set()
  for host in range(hosts):
    it = iter(pipeline.make_eval_dataset(_colour_source(n, bad), batch_size=batch,
                                         resolution=RES, shard_index=host, shard_count=hosts))
    batches = list(it)
    num_batches.add(len(batches))
    for b in batches:
      assert b["image"].shape == (batch, RES, RES, 3) and b["mask"].shape == (batch,)
      assert (b["image"][~b["mask"]] == 0).all()
      seen += [(k, i) for k, i, m in zip(b["key"], _ids(b["image"]), b["mask"]) if m]
      totals = _add(totals, b["skipped"])
    assert it.skipped_total == {r: sum(b["skipped"][r] for b in batches) for r in totals}
  assert num_batches == {pipeline.eval_num_batches(n, batch, hosts)}  # Hosts in lock-step.
  good = [i for i in range(n) if i not in bad]
  assert sorted(seen) == [(f"{i:03d}", i) for i in good]
  assert totals == {**NO_SKIPS, "empty": int(n > 1), "missing": int(n > 5)}


def test_eval_uses_the_resize_and_centre_crop_geometry():
  ramp = np.broadcast_to(np.linspace(0, 255, 48)[None, :, None], (16, 48, 3))
  src = _ListSource([{"key": "r", "image": np.rint(ramp).astype(np.uint8)}])
  (batch,) = pipeline.make_eval_dataset(src, batch_size=1, resolution=RES, shard_index=0,
                                        shard_count=1)
  # 16x48 -> 8x24, centre 8 columns = the middle third of the ramp.
  row = (batch["image"][0, 0, :, 0] + 1) * 127.5
  assert 255 / 3 - 10 < row[0] < row[-1] < 2 * 255 / 3 + 10


def test_argument_errors_name_the_argument():
  src = _colour_source(4)
  with pytest.raises(ValueError, match="shard_index"):
    _train(src, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="batch_size"):
    _train(src, batch_size=0)
  with pytest.raises(TypeError, match="random-access"):
    _train([1, 2, 3].__iter__())
  # Defaults come from JAX: one process here.
  assert pipeline.resolve_shard(None, None) == (0, 1)


@pytest.mark.slow
def test_worker_processes_cover_each_epoch_and_resume_exactly(tmp_path):
  root = tmp_path / "imgs"
  root.mkdir()
  for i in range(12):
    Image.fromarray(np.full((10, 12, 3), 8 * i, np.uint8)).save(root / f"{i:02d}.png")
  (root / "bad.png").write_bytes(b"")
  src = sources.ImageFolderSource(root)
  it = iter(_train(src, batch_size=3, num_workers=2))
  try:
    first = [next(it) for _ in range(4)]
    assert sorted(i for b in first for i in _ids(b["image"])) == list(range(12))
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
  finally:
    it.close()
  resumed = iter(_train(src, batch_size=3, num_workers=2))
  try:
    resumed.set_state(state)
    for e in expected:
      np.testing.assert_array_equal(e["image"], next(resumed)["image"])
  finally:
    resumed.close()
