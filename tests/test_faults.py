"""Faults a hostile-input pass found (issue 16), each with the outcome it must have now.

NaN pixels in encode; crashed / re-run ArrayRecord tokenize outputs; FIFOs, devices and huge
files among the images; unwritable outputs found only after the work.
"""

import json
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

from dualtoken_jax import DualTokenizer, config_files, generate, tokenize
from dualtoken_jax.data import code_shards, decode, sample_photos
from dualtoken_jax.data import webdataset

REF = FIXTURES / "dualtoken_ref_a"
SOURCE = ["--reference", str(REF / "checkpoint.safetensors")]


# ---------------------------------------------------------------- 1. NaN pixels
IMAGE_METHODS = ("encode", "encode_all", "reconstruct", "siglip_embedding", "semantic_features",
                 "image_embedding")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method", IMAGE_METHODS)
def test_images_with_a_few_non_finite_pixels_are_refused_by_every_entry_point(method, bad):
  # On CPU, min/max of a large array skip NaNs: the old range check let these through.
  cfg = config_files.load("configs/dualtoken_tiny.py").model
  tok = DualTokenizer(cfg, {})  # the check comes before any use of the weights
  images = np.zeros((2, cfg.image_size, cfg.image_size, 3), np.float32)
  images[1, 17, 5, 2] = bad
  with pytest.raises(ValueError, match="NaN or infinite"):
    getattr(tok, method)(images)


# ---------------------------------------------------------------- 3. ArrayRecord outputs
def write_shards(directory, n, shard_size, **kwargs):
  writer = code_shards.ShardWriter(directory, shard_size, **kwargs)
  for i in range(n):
    writer.write(f"k{i}", np.full((2, 2, 1), i), np.full((2, 2, 1), -i))
  writer.close()
  return writer


def test_shard_directory_that_disagrees_with_its_manifest_is_refused_naming_the_file(tmp_path):
  d = tmp_path / "shards"
  write_shards(d, 5, 2)
  assert sorted(p.name for p in d.iterdir()) == [
      *[f"codes-0000{i}.array_record{s}" for i in range(3) for s in ("", ".keys.json")],
      "manifest.json"]
  assert [r["key"] for r in code_shards.read(d)] == [f"k{i}" for i in range(5)]
  manifest = json.loads((d / "manifest.json").read_text())
  assert [s["records"] for s in manifest["shards"]] == [2, 2, 1]
  assert json.loads((d / "codes-00001.array_record.keys.json").read_text()) == ["k2", "k3"]

  def refused(match):
    with pytest.raises(code_shards.ShardDirectoryError, match=match):
      list(code_shards.read(d))

  (d / "codes-00003.array_record").write_bytes(b"")  # a kill -9 before the first byte
  refused("codes-00003.array_record is not listed")
  (d / "codes-00003.array_record").unlink()
  backup = (d / "codes-00001.array_record").read_bytes()
  (d / "codes-00001.array_record").write_bytes(b"")
  refused("codes-00001.array_record has 0 bytes")
  (d / "codes-00001.array_record").write_bytes(b"\0" * len(backup))
  refused("codes-00001.array_record cannot be read")
  (d / "codes-00001.array_record").unlink()
  refused("codes-00001.array_record is listed in manifest.json but missing")
  (d / "codes-00001.array_record").write_bytes(backup)
  assert len(list(code_shards.read(d))) == 5
  (d / "manifest.json").unlink()
  refused("has no manifest.json")
  # A temporary shard (an unfinished write) is not a shard.
  write_shards(d, 3, 2, overwrite=True)
  (d / "codes-00002.array_record.tmp").write_bytes(b"")
  assert len(list(code_shards.read(d))) == 3


def test_writer_resumes_or_overwrites_and_never_writes_a_key_twice(tmp_path):
  d = tmp_path / "shards"
  write_shards(d, 3, 2)
  writer = code_shards.ShardWriter(d, 4)  # another shard size: resumes after the old shards
  assert writer.done_keys == {"k0", "k1", "k2"}
  with pytest.raises(ValueError, match="'k1' is already in a shard"):
    writer.write("k1", np.zeros((2, 2, 1)), np.zeros((2, 2, 1)))
  writer.write("k9", np.zeros((2, 2, 1)), np.zeros((2, 2, 1)))
  writer.close()
  assert [r["key"] for r in code_shards.read(d)] == ["k0", "k1", "k2", "k9"]
  # Shards from an older version (no manifest) are refused until overwritten.
  (d / "manifest.json").unlink()
  with pytest.raises(code_shards.ShardDirectoryError, match="--overwrite"):
    code_shards.ShardWriter(d, 2)
  write_shards(d, 2, 5, overwrite=True)
  assert [r["key"] for r in code_shards.read(d)] == ["k0", "k1"]
  assert len(list(d.glob("*.array_record"))) == 1 and len(list(d.glob("*.keys.json"))) == 1


def test_manifest_size_is_constant_per_shard_whatever_the_keys(tmp_path):
  # 1.28M keys used to be stored in the manifest and rewritten after every shard (O(n^2)).
  sizes = {}
  for n_keys in (2, 200):
    d = tmp_path / str(n_keys)
    writer = code_shards.ShardWriter(d, n_keys)
    for i in range(2 * n_keys):  # two shards, of n_keys long keys each
      writer.write(f"{'long/path/' * 10}{i:06d}.jpg", np.zeros((1, 1, 1)), np.zeros((1, 1, 1)))
    writer.close()
    sizes[n_keys] = (d / "manifest.json").stat().st_size
    assert len(keys_of(d)) == 2 * n_keys
    assert code_shards.ShardWriter(d, 7).done_keys == set(keys_of(d))
  assert sizes[200] - sizes[2] < 2 * 16  # only the digits of the records/bytes fields grow
  assert sizes[200] < 2 * 250


def test_resume_refuses_a_missing_or_altered_keys_sidecar_naming_it(tmp_path):
  d = tmp_path / "shards"
  write_shards(d, 4, 2)
  sidecar = d / "codes-00001.array_record.keys.json"
  good = sidecar.read_bytes()
  sidecar.write_text(json.dumps(["k2", "k0"]))  # would duplicate k0
  with pytest.raises(code_shards.ShardDirectoryError, match="00001.array_record.keys.json: its sha256"):
    code_shards.ShardWriter(d, 2)
  sidecar.unlink()
  with pytest.raises(code_shards.ShardDirectoryError, match="00001.array_record.keys.json .* missing"):
    code_shards.ShardWriter(d, 2)
  assert len(keys_of(d)) == 4  # reading needs no sidecar
  sidecar.write_bytes(good)
  (d / "codes-00000.array_record.keys.json").rename(d / "codes-00009.array_record.keys.json")
  (d / "codes-00000.array_record.keys.json").write_bytes(b"[]")  # mismatched; stray after
  with pytest.raises(code_shards.ShardDirectoryError, match="codes-00000.array_record.keys.json"):
    code_shards.ShardWriter(d, 2)


def tokenize_dir(out, *extra, inputs=("sample",)):
  return tokenize.main([*inputs, *SOURCE, "--output_dir", str(out), "--format", "array_record",
                        "--batch_size", "2", *extra])


def keys_of(path):
  keys = [r["key"] for r in code_shards.read(path)]
  assert len(keys) == len(set(keys)), "duplicated keys"
  return keys


def test_tokenize_killed_mid_run_resumes_without_duplicates(tmp_path, monkeypatch, capsys):
  out = tmp_path / "shards"
  n = len(sample_photos.sample_photo_paths())
  real_encode, calls = DualTokenizer.encode, []

  def killed_on_the_4th_batch(self, images):
    calls.append(len(images))
    if len(calls) == 4:
      raise KeyboardInterrupt  # a Ctrl-C (or any error) in the middle of shard 2
    return real_encode(self, images)

  with monkeypatch.context() as m:
    m.setattr(DualTokenizer, "encode", killed_on_the_4th_batch)
    with pytest.raises(KeyboardInterrupt):
      tokenize_dir(out, "--shard_size", "4")
  # Batches of 2: shards 0 (4 records) is complete, shard 1 was dropped, nothing half-written.
  assert sorted(p.name for p in out.iterdir()) == [
      "codes-00000.array_record", "codes-00000.array_record.keys.json", "manifest.json"]
  assert len(keys_of(out)) == 4

  # A kill -9 instead: shard 1 renamed but not yet listed, shard 2 a 0-byte temporary file.
  assert tokenize_dir(out, "--shard_size", "4") == 0
  assert "resuming: 4 of" in capsys.readouterr().out
  manifest = json.loads((out / "manifest.json").read_text())
  manifest["shards"] = manifest["shards"][:1]
  (out / "manifest.json").write_text(json.dumps(manifest))
  (out / "codes-00002.array_record.tmp").write_bytes(b"")
  with pytest.raises(code_shards.ShardDirectoryError, match="codes-00001.array_record"):
    list(code_shards.read(out))
  assert tokenize_dir(out, "--shard_size", "3") == 0  # another shard size resumes consistently
  assert sorted(keys_of(out)) == sorted(sample_photos.sample_photo_paths())
  assert not list(out.glob("*.tmp"))
  assert len(list(out.glob("*.keys.json"))) == len(list(out.glob("*.array_record")))

  # A complete output: nothing left to do; --overwrite starts again with its own shard size.
  assert tokenize_dir(out, "--shard_size", "2") == 0
  assert f"resuming: {n} of {n}" in capsys.readouterr().out
  assert len(keys_of(out)) == n
  assert tokenize_dir(out, "--shard_size", "5", "--overwrite") == 0
  assert len(keys_of(out)) == n and len(list(out.glob("*.array_record"))) == -(-n // 5)
  assert len(list(out.glob("*.keys.json"))) == -(-n // 5)


def test_tokenize_refuses_shards_it_cannot_account_for(tmp_path, capsys):
  out = tmp_path / "shards"
  write_shards(out, 2, 2)
  (out / "manifest.json").unlink()  # e.g. written by an older version
  with pytest.raises(SystemExit) as e:
    tokenize_dir(out)
  assert e.value.code == 2
  assert "no manifest.json" in capsys.readouterr().err


# ---------------------------------------------------------------- 5. special files
SPECIAL_FILES_CHECK = textwrap.dedent("""
    import json, sys
    from dualtoken_jax.data import image_inputs, sources
    folder = sys.argv[1]
    src = sources.ImageFolderSource(folder, max_bytes=100_000)
    out = {"source": {k: src[i].get("skip") for i, k in enumerate(src.keys)}}
    items = image_inputs.collect([folder])
    batch = next(image_inputs.batches(items, 32, len(items), max_bytes=100_000))
    out["batch"] = {"keys": [k.rsplit("/", 1)[-1] for k in batch.keys],
                    "skipped": {k.rsplit("/", 1)[-1]: r for k, r in batch.skipped}}
    print(json.dumps(out))
""")


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"),
                    reason="needs FIFOs and /dev/zero")
def test_fifo_device_and_huge_files_are_skipped_not_read(tmp_path):
  folder = tmp_path / "imgs"
  folder.mkdir()
  Image.new("RGB", (40, 30), (10, 200, 30)).save(folder / "good.png")
  os.mkfifo(folder / "x.jpg")  # opening it to read would block until a writer comes
  os.symlink("/dev/zero", folder / "zero.jpg")  # reading it would never end
  (folder / "huge.png").write_bytes(b"\x89PNG" + b"\0" * 200_000)
  os.symlink(folder / "good.png", folder / "link.png")  # a link to a regular file is fine
  # In a subprocess with a memory limit and a timeout: a regression fails, it cannot hang.
  limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))\n"
  try:
    run = subprocess.run([sys.executable, "-c", limit + SPECIAL_FILES_CHECK, str(folder)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
  finally:
    _unblock(folder / "x.jpg")
  assert run.returncode == 0, run.stderr[-3000:]
  got = json.loads(run.stdout.strip().splitlines()[-1])
  assert got["source"] == {"good.png": None, "huge.png": "too_large", "link.png": None,
                           "x.jpg": "not_a_file", "zero.jpg": "not_a_file"}
  assert sorted(got["batch"]["keys"]) == ["good.png", "link.png"]
  skipped = got["batch"]["skipped"]
  assert set(skipped) == {"huge.png", "x.jpg", "zero.jpg"}
  assert "a FIFO" in skipped["x.jpg"] and "a character device" in skipped["zero.jpg"]
  assert "max_bytes=100000" in skipped["huge.png"]


def _unblock(fifo):
  """Lets a reader stuck in open() of `fifo` (a regression) go: a writer appears and leaves."""
  try:
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
  except OSError:
    pass  # no reader waiting: fine


def test_read_image_file_limits_and_kinds(tmp_path):
  (tmp_path / "a.png").write_bytes(b"x" * 10)
  assert decode.read_image_file(tmp_path / "a.png", max_bytes=10) == b"x" * 10
  with pytest.raises(decode.SkipImage, match="max_bytes=9") as e:
    decode.read_image_file(tmp_path / "a.png", max_bytes=9)
  assert e.value.reason == "too_large"
  with pytest.raises(decode.SkipImage, match="a directory") as e:
    decode.read_image_file(tmp_path)
  assert e.value.reason == "not_a_file"
  with pytest.raises(FileNotFoundError):
    decode.read_image_file(tmp_path / "gone.png")


def test_webdataset_member_over_the_byte_limit_is_skipped(tmp_path):
  path = tmp_path / "shard.tar"
  with tarfile.open(path, "w") as tar:
    for name, size in (("small.jpg", 10), ("big.jpg", 5000)):
      (tmp_path / name).write_bytes(b"\xff" * size)
      tar.add(tmp_path / name, arcname=name)
  src = webdataset.WebDatasetSource(str(path), max_bytes=1000)
  got = {src[i]["key"]: src[i] for i in range(len(src))}
  assert got["shard.tar/big"]["skip"] == "too_large"
  assert got["shard.tar/small"]["image_bytes"] == b"\xff" * 10


# ---------------------------------------------------------------- 6. unwritable outputs
@pytest.mark.parametrize("flag,make_path", [
    ("--output", lambda t: t / "file.txt" / "codes.npz"),  # parent is a regular file
    ("--output", lambda t: t),                             # a directory
    ("--output", lambda t: t / "codes.bin"),               # not .npz: read() would not know it
    ("--output_dir", lambda t: t / "file.txt"),            # exists, not a directory
    ("--output_dir", lambda t: t / "file.txt" / "shards"),
])
def test_tokenize_checks_its_output_before_any_work(tmp_path, capsys, flag, make_path):
  (tmp_path / "file.txt").write_text("x")
  target = make_path(tmp_path)
  fmt = ["--format", "array_record"] if flag == "--output_dir" else []
  with pytest.raises(SystemExit) as e:  # the tokenizer does not even exist: it is never loaded
    tokenize.main(["sample", "--reference", str(tmp_path / "missing.pt"), flag, str(target), *fmt])
  assert e.value.code == 2
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith(f"python -m dualtoken_jax.tokenize: error: {flag} {target}: ")


def test_generate_checks_its_output_before_loading_the_model(tmp_path, capsys):
  (tmp_path / "file.txt").write_text("x")
  for out in (tmp_path / "file.txt" / "cat.png", tmp_path / "cat.unknown"):
    with pytest.raises(SystemExit) as e:
      generate.main(["--checkpoint", str(tmp_path / "none"), "--prompt", "x", "--out", str(out)])
    assert e.value.code == 2
    assert f"error: --out {out}" in capsys.readouterr().err
