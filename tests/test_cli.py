"""The command-line tools end to end: tokenize, reconstruct, convert (run in-process)."""

import shutil

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image
from safetensors.numpy import load_file

from dualtoken_jax import DualTokenizer, convert, reconstruct, tokenize

from dualtoken_jax.data import code_shards
from dualtoken_jax.data import load_image, sample_photos

REF = FIXTURES / "dualtoken_ref_a"
SOURCE = ["--reference", str(REF / "checkpoint.safetensors")]


@pytest.fixture(scope="module")
def tok():
  return DualTokenizer.from_reference(REF / "checkpoint.safetensors")


@pytest.fixture()
def folder(tmp_path):
  """Three real photos in nested folders, plus a corrupt and an empty file."""
  paths = list(sample_photos.sample_photo_paths().values())[:3]
  (tmp_path / "photos" / "sub").mkdir(parents=True)
  for i, p in enumerate(paths):
    shutil.copy(p, tmp_path / "photos" / ("sub" if i else "") / f"img{i}{p[-4:]}")
  (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
  (tmp_path / "photos" / "empty.png").write_bytes(b"")
  return tmp_path / "photos"


def test_tokenize_npz_reports_skipped_files(tok, folder, tmp_path, capsys):
  status = tokenize.main([str(folder), *SOURCE, "--output", str(tmp_path / "codes.npz"), "--batch_size", "2"])
  assert status == 1
  err = capsys.readouterr().err
  assert "broken.jpg" in err and "empty.png" in err and "2 of 5" in err
  records = list(code_shards.read(tmp_path / "codes.npz"))
  assert [r["key"].split("/")[-1] for r in records] == ["img0.png", "img1.png", "img2.png"]
  images = np.stack([load_image(folder / r["key"].split("photos/")[-1], 64) for r in records])
  codes = tok.encode(images)
  np.testing.assert_array_equal(np.stack([r["pixel"] for r in records]), codes.pixel)
  np.testing.assert_array_equal(np.stack([r["semantic"] for r in records]), codes.semantic)


def test_tokenize_array_record_shards(tok, tmp_path):
  status = tokenize.main(["sample", *SOURCE, "--output_dir", str(tmp_path / "shards"),
                          "--format", "array_record", "--shard_size", "4"])
  assert status == 0
  shards = sorted((tmp_path / "shards").glob("*.array_record"))
  n = len(sample_photos.sample_photo_paths())
  assert len(shards) == -(-n // 4)
  records = list(code_shards.read(tmp_path / "shards"))
  assert len(records) == n and records[0]["pixel"].shape == (9, 9, 3)
  first = load_image(sample_photos.sample_photo_paths()[records[0]["key"]], 64)[None]
  np.testing.assert_array_equal(records[0]["semantic"], tok.encode(first).semantic[0])


def test_tokenize_rejects_missing_input_and_bad_flags(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    tokenize.main([str(tmp_path / "nope"), *SOURCE, "--output", str(tmp_path / "c.npz")])
  with pytest.raises(SystemExit):
    tokenize.main(["sample", *SOURCE])  # no output given
  with pytest.raises(SystemExit, match="exactly one tokenizer source"):
    tokenize.main(["sample", "--output", str(tmp_path / "c.npz")])


def test_reconstruct_writes_side_by_side_grid(folder, tmp_path, capsys):
  out = tmp_path / "grid.png"
  status = reconstruct.main([str(folder), *SOURCE, "--output", str(out), "--columns", "2"])
  assert status == 1  # the broken files are skipped and reported
  grid = Image.open(out)
  # 3 readable images -> 2 rows of 2 pairs of 64-px images (plus padding and captions).
  assert grid.width == 2 * (2 * 64 + 12) and grid.height == 2 * (64 + 14 + 8)
  assert "mean PSNR" in capsys.readouterr().out


def test_convert_both_directions(tmp_path):
  assert convert.main([*SOURCE, "--output", str(tmp_path / "own")]) == 0
  assert convert.main(["--checkpoint", str(tmp_path / "own"), "--to_reference",
                       str(tmp_path / "ref" / "model.safetensors")]) == 0
  a = load_file(str(REF / "checkpoint.safetensors"))
  b = load_file(str(tmp_path / "ref" / "model.safetensors"))
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
