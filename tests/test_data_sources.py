"""Sources: image folders, webdataset tars (incl. hostile members), ArrayRecord / TFDS-like
sources, the tf.Example codec, and the bundled sample photos."""

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from PIL import Image

import tf_example_writer
from dualtoken_jax.data import decode
from dualtoken_jax.data import pipeline
from dualtoken_jax.data import records
from dualtoken_jax.data import sample_photos
from dualtoken_jax.data import sources
from dualtoken_jax.data import tf_example
from dualtoken_jax.data import webdataset


def _png(value: int, size=(6, 4)) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full(size + (3,), value, np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _jpeg(value: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def _value(record) -> int:
  """The constant pixel value an image record was written with."""
  return int(np.asarray(decode.DecodeImage().map(record)["image"])[0, 0, 0])


def _tree(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


# --- Image folders -------------------------------------------------------------------------


def test_image_folder_is_recursive_sorted_and_ignores_other_files(tmp_path):
  files = {"b/2.png": 2, "a/z/3.JPG": 3, "a/1.webp": 1, "c.jpeg": 4}
  for rel, value in files.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    fmt = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "jpeg": "JPEG"}[rel.rsplit(".")[-1].lower()]
    Image.fromarray(np.full((4, 4, 3), value * 50, np.uint8)).save(tmp_path / rel, fmt,
                                                                   quality=100)
  (tmp_path / "notes.txt").write_text("not an image")
  (tmp_path / "._c.jpeg").write_bytes(b"AppleDouble junk")
  (tmp_path / ".hidden").mkdir()
  (tmp_path / ".hidden" / "x.png").write_bytes(_png(0))

  src = sources.ImageFolderSource(tmp_path)
  keys = [src[i]["key"] for i in range(len(src))]
  assert keys == ["a/1.webp", "a/z/3.JPG", "b/2.png", "c.jpeg"]
  for i, key in enumerate(keys):
    assert abs(_value(src[i]) - files[key] * 50) <= 2
  assert "num_images=4" in repr(src)


def test_image_folder_errors_name_what_was_expected(tmp_path):
  (tmp_path / "readme.md").write_text("x")
  with pytest.raises(ValueError, match=r"no images found under .*\.jpg, \.jpeg, \.png"):
    sources.ImageFolderSource(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.ImageFolderSource(tmp_path / "nope")


def test_image_folder_file_deleted_after_indexing_is_a_missing_record(tmp_path):
  (tmp_path / "a.png").write_bytes(_png(1))
  (tmp_path / "b.png").write_bytes(_png(2))
  src = sources.ImageFolderSource(tmp_path)
  os.remove(tmp_path / "a.png")
  assert src[0]["skip"] == "missing" and src[0]["key"] == "a.png"
  assert _value(src[1]) == 2


# --- Webdataset shards ---------------------------------------------------------------------


def _add(tar, name, data=b"", kind=tarfile.REGTYPE, linkname=""):
  info = tarfile.TarInfo(name)
  info.type = kind
  info.size = len(data) if kind == tarfile.REGTYPE else 0
  info.linkname = linkname
  tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _write_shard(path, samples, extra=()):
  with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
    for key, fields in samples:
      for ext, data in fields.items():
        _add(tar, f"{key}.{ext}", data)
    for args in extra:
      _add(tar, *args)


def test_webdataset_groups_members_by_key_and_reads_captions(tmp_path):
  shard0 = tmp_path / "shard-0000.tar"
  shard1 = tmp_path / "shard-0001.tar"
  _write_shard(shard0, [
      ("000", {"jpg": _jpeg(0), "txt": b" a photo \n", "json": b'{"caption": "ignored"}'}),
      ("001", {"json": json.dumps({"caption": "from json"}).encode(), "png": _png(40)}),
      ("002", {"txt": b"caption without an image"}),
      ("dir/003", {"webp": _png(60), "cls": b"7"}),  # PNG bytes under .webp: PIL sniffs.
  ])
  _write_shard(shard1, [("004", {"jpg": _jpeg(250)}), ("005", {"png": _png(80), "jpg": _jpeg(0)})])

  src = webdataset.WebDatasetSource(str(tmp_path / "shard-{0000..0001}.tar"),
                                    with_captions=True, num_index_threads=2)
  assert len(src) == 5
  got = [src[i] for i in range(len(src))]
  assert [r["key"] for r in got] == ["shard-0000.tar/000", "shard-0000.tar/001",
                                     "shard-0000.tar/dir/003", "shard-0001.tar/004",
                                     "shard-0001.tar/005"]
  assert [r["caption"] for r in got] == ["a photo", "from json", None, None, None]
  assert [_value(r) for r in got[1:3]] == [40, 60]
  assert abs(_value(got[3]) - 250) <= 2
  assert abs(_value(got[4]) - 0) <= 2  # "jpg" precedes "png" in the default preference.
  assert src.index_stats == {"shards": 2, "samples": 5, "bad_members": 0,
                             "ignored_members": 2, "truncated_shards": 0,
                             "unreadable_shards": 0}
  assert "caption" not in webdataset.WebDatasetSource(str(shard0))[0]


def test_webdataset_rejects_hostile_members_without_writing_anything(tmp_path, monkeypatch):
  shards = tmp_path / "shards"
  shards.mkdir()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  abs_existed = os.path.exists("/abs.jpg")
  _write_shard(shards / "evil.tar", [("ok", {"jpg": _jpeg(9)})], extra=[
      ("../evil.jpg", _jpeg(1)),
      ("/abs.jpg", _jpeg(2)),
      ("a/../../up.png", _png(3)),
      ("link.jpg", b"", tarfile.SYMTYPE, "/etc/passwd"),
      ("../evil.txt", b"caption"),
  ])
  before = _tree(tmp_path)

  src = webdataset.WebDatasetSource(shards / "evil.tar")
  got = [src[i] for i in range(len(src))]
  assert not records.is_skipped(got[0]) and got[0]["key"] == "evil.tar/ok"
  assert [r["skip"] for r in got[1:]] == ["bad_member"] * 4
  assert sorted(r["key"] for r in got[1:]) == sorted(
      f"evil.tar/{n}" for n in ["../evil.jpg", "/abs.jpg", "a/../../up.png", "link.jpg"])
  assert src.index_stats["bad_members"] == 5
  # Through a pipeline they are counted, never decoded.
  it = iter(pipeline.make_eval_dataset(src, batch_size=5, resolution=8, shard_index=0,
                                       shard_count=1))
  (batch,) = list(it)
  assert batch["mask"].tolist() == [True, False, False, False, False]
  assert batch["skipped"]["bad_member"] == it.skipped_total["bad_member"] == 4
  assert _tree(tmp_path) == before
  assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "up.png").exists()
  assert os.path.exists("/abs.jpg") == abs_existed


def test_webdataset_damaged_shards(tmp_path):
  full = tmp_path / "full.tar"
  _write_shard(full, [(f"{i:03d}", {"png": _png(i, size=(40, 40))}) for i in range(4)])
  data = full.read_bytes()
  with tarfile.open(full) as tar:
    members = tar.getmembers()
  # Cut inside the last member's payload: its header is indexed, its read comes up short.
  cut = tmp_path / "cut.tar"
  cut.write_bytes(data[:members[-1].offset_data + members[-1].size // 2])
  src = webdataset.WebDatasetSource(cut)
  assert len(src) == 4
  assert [_value(src[i]) for i in range(3)] == [0, 1, 2]
  assert src[3]["skip"] == "read_error" and "truncated" in src[3]["error"]
  # Garbage where the second header should be: keep what was indexed before it.
  garbled = tmp_path / "garbled.tar"
  second_header = members[1].offset
  garbled.write_bytes(data[:second_header] + b"\xff" * 512 + data[second_header + 512:])
  src = webdataset.WebDatasetSource(garbled)
  assert len(src) == 1 and src.index_stats["truncated_shards"] == 1
  assert _value(src[0]) == 0


def test_webdataset_shard_deleted_after_indexing_and_bad_inputs(tmp_path):
  shard = tmp_path / "s.tar"
  _write_shard(shard, [("a", {"png": _png(5)})])
  src = webdataset.WebDatasetSource(shard)
  os.remove(shard)
  assert src[0]["skip"] == "missing"

  gz = tmp_path / "s.tar.gz"
  with tarfile.open(gz, "w:gz") as tar:
    _add(tar, "a.png", _png(5))
  with pytest.raises(ValueError, match="is a compressed tar"):
    webdataset.WebDatasetSource(gz)
  # A failed download among good shards is skipped and counted.
  good = tmp_path / "good.tar"
  _write_shard(good, [("b", {"png": _png(6)})])
  (tmp_path / "broken.tar").write_bytes(b"")
  src = webdataset.WebDatasetSource([tmp_path / "broken.tar", good])
  assert len(src) == 1 and src.index_stats["unreadable_shards"] == 1 and _value(src[0]) == 6
  only_text = tmp_path / "t.tar"
  _write_shard(only_text, [("a", {"txt": b"x"})])
  with pytest.raises(ValueError, match=r"no images found in 1 tar shard.*\.jpg"):
    webdataset.WebDatasetSource(only_text)
  with pytest.raises(ValueError, match="no webdataset .tar shards matched"):
    webdataset.WebDatasetSource(str(tmp_path / "none-*.tar"))


SPECIAL_SHARDS_CHECK = textwrap.dedent("""
    import json, sys
    from dualtoken_jax.data import sources, webdataset
    d = sys.argv[1]
    errors = {}
    for name, make in [
        ("glob", lambda: webdataset.WebDatasetSource(d + "/s-*.tar")),
        ("braces", lambda: webdataset.WebDatasetSource(d + "/s-{0..1}.tar")),
        ("named", lambda: webdataset.WebDatasetSource(d + "/s-1.tar")),
        ("dir", lambda: webdataset.WebDatasetSource(d + "/su*")),
        ("array_record", lambda: sources.ArrayRecordSource(d + "/s-*.tar"))]:
      try:
        make()
        errors[name] = None
      except ValueError as e:
        errors[name] = str(e)
    print(json.dumps(errors))
""")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_or_directory_matched_as_a_shard_is_refused_not_opened(tmp_path):
  _write_shard(tmp_path / "s-0.tar", [("a", {"png": _png(5)})])
  os.mkfifo(tmp_path / "s-1.tar")  # opening it to read would block until a writer comes
  (tmp_path / "sub").mkdir()
  # In a subprocess with a timeout: a regression fails, it cannot hang.
  try:
    run = subprocess.run([sys.executable, "-c", SPECIAL_SHARDS_CHECK, str(tmp_path)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
  finally:
    try:  # a reader stuck in open() (a regression) gets a writer and goes
      os.close(os.open(tmp_path / "s-1.tar", os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
      pass
  assert run.returncode == 0, run.stderr[-3000:]
  got = json.loads(run.stdout.strip().splitlines()[-1])
  fifo = str(tmp_path / "s-1.tar")
  for name in ("glob", "braces", "named", "array_record"):
    assert got[name] and f"{fifo} is a FIFO, not a regular file" in got[name], name
  assert "webdataset .tar shards: " in got["glob"] and "matched by" in got["glob"]
  assert "ArrayRecord files: " in got["array_record"]
  assert f"{tmp_path / 'sub'} is a directory, not a regular file" in got["dir"]


def test_brace_expansion():
  assert webdataset.expand_braces("cc12m-train-{0000..0002}.tar") == [
      "cc12m-train-0000.tar", "cc12m-train-0001.tar", "cc12m-train-0002.tar"]
  assert webdataset.expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9",
                                                      "b-10"]
  assert webdataset.expand_braces("plain.tar") == ["plain.tar"]


# --- tf.Example, ArrayRecord and TFDS-like sources ------------------------------------------


def _protobuf_example_class():
  """`tf.train.Example` built from its .proto definition with the protobuf runtime."""
  pb = pytest.importorskip("google.protobuf")
  del pb
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
  f = descriptor_pb2.FileDescriptorProto(name="example_test.proto", package="tft",
                                         syntax="proto3")
  label_rep = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
  label_opt = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
  t = descriptor_pb2.FieldDescriptorProto
  for name, ftype in (("BytesList", t.TYPE_BYTES), ("FloatList", t.TYPE_FLOAT),
                      ("Int64List", t.TYPE_INT64)):
    m = f.message_type.add(name=name)
    m.field.add(name="value", number=1, label=label_rep, type=ftype)
  feature = f.message_type.add(name="Feature")
  feature.oneof_decl.add(name="kind")
  for i, name in enumerate(("bytes_list", "float_list", "int64_list")):
    feature.field.add(name=name, number=i + 1, label=label_opt, type=t.TYPE_MESSAGE,
                      type_name=".tft." + ["BytesList", "FloatList", "Int64List"][i],
                      oneof_index=0)
  features = f.message_type.add(name="Features")
  entry = features.nested_type.add(name="FeatureEntry")
  entry.options.map_entry = True
  entry.field.add(name="key", number=1, label=label_opt, type=t.TYPE_STRING)
  entry.field.add(name="value", number=2, label=label_opt, type=t.TYPE_MESSAGE,
                  type_name=".tft.Feature")
  features.field.add(name="feature", number=1, label=label_rep, type=t.TYPE_MESSAGE,
                     type_name=".tft.Features.FeatureEntry")
  example = f.message_type.add(name="Example")
  example.field.add(name="features", number=1, label=label_opt, type=t.TYPE_MESSAGE,
                    type_name=".tft.Features")
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tft.Example"))


def test_tf_example_codec_matches_the_protobuf_runtime():
  example_cls = _protobuf_example_class()
  ours = tf_example_writer.encode_example({"image": b"\x00\xffjpeg", "label": [3, -7, 2**40],
                                    "score": [0.5, -2.25], "name": "cat.jpg"})
  theirs = example_cls.FromString(ours)
  assert theirs.features.feature["image"].bytes_list.value == [b"\x00\xffjpeg"]
  assert list(theirs.features.feature["label"].int64_list.value) == [3, -7, 2**40]
  assert list(theirs.features.feature["score"].float_list.value) == [0.5, -2.25]

  msg = example_cls()
  msg.features.feature["image"].bytes_list.value.append(b"abc" * 100)
  msg.features.feature["id"].int64_list.value.extend([-1, 5])
  msg.features.feature["w"].float_list.value.extend([1.5])
  msg.features.feature["empty"].bytes_list.SetInParent()
  parsed = tf_example.parse_example(msg.SerializeToString())
  assert parsed == {"image": [b"abc" * 100], "id": [-1, 5], "w": [1.5], "empty": []}
  with pytest.raises(ValueError):
    tf_example.parse_example(msg.SerializeToString()[:-3])


def test_array_record_source_reads_tfds_style_examples_and_raw_bytes(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  path = str(tmp_path / "data.array_record-00000-of-00001")
  writer = ArrayRecordWriter(path, "group_size:1")
  for i in range(3):
    writer.write(tf_example_writer.encode_example({"image": _png(10 * i), "file_name": f"img{i}.png",
                                            "label": i}))
  writer.write(b"\x0a\xff\xff")  # A corrupt record.
  writer.write(tf_example_writer.encode_example({"image": [], "file_name": "none.png"}))
  writer.close()

  src = sources.ArrayRecordSource(str(tmp_path / "*.array_record*"), key_feature="file_name")
  assert len(src) == 5
  assert [src[i]["key"] for i in range(3)] == ["img0.png", "img1.png", "img2.png"]
  assert [_value(src[i]) for i in range(3)] == [0, 10, 20]
  assert src[3]["skip"] == "decode_error"
  assert src[4]["skip"] == "empty"
  with pytest.raises(KeyError, match=r"no feature 'img'.*'file_name', 'image', 'label'"):
    sources.ArrayRecordSource(path, image_key="img")[0]

  raw = str(tmp_path / "raw.array_record")
  writer = ArrayRecordWriter(raw, "group_size:1")
  writer.write(_png(77))
  writer.close()
  src = sources.ArrayRecordSource(raw, record_format="raw")
  assert src[0]["key"].endswith("/0") and _value(src[0]) == 77
  with pytest.raises(FileNotFoundError):
    sources.ArrayRecordSource(str(tmp_path / "missing.array_record"))


class _FakeTfdsSource:
  """What `tfds.data_source` returns: len(), [i] -> dict of numpy features."""

  def __init__(self, images, encoded=False, fail_at=None):
    self._images, self._encoded, self._fail_at = images, encoded, fail_at

  def __len__(self):
    return len(self._images)

  def __getitem__(self, i):
    if i == self._fail_at:
      raise OSError("remote read failed")
    image = self._images[i]
    return {"image": _png(int(image[0, 0, 0])) if self._encoded else image,
            "file_name": np.bytes_(f"n{i:02d}.JPEG"), "label": np.int64(i)}


def test_record_source_adapts_tfds_like_sources():
  images = [np.full((5, 7, 3), 30 * i, np.uint8) for i in range(3)]
  decoded = sources.RecordSource(_FakeTfdsSource(images), key_feature="file_name")
  assert decoded[1]["key"] == "n01.JPEG" and decoded[1]["image"].shape == (5, 7, 3)
  assert [_value(decoded[i]) for i in range(3)] == [0, 30, 60]
  encoded = sources.RecordSource(_FakeTfdsSource(images, encoded=True, fail_at=2), name="tfds")
  assert encoded[0]["key"] == "tfds/0" and "image_bytes" in encoded[0]
  assert _value(encoded[1]) == 30
  assert encoded[2]["skip"] == "read_error" and "remote read failed" in encoded[2]["error"]
  with pytest.raises(TypeError, match="random-access"):
    sources.RecordSource(object())


# --- Sample photos ---------------------------------------------------------------------------


def test_sample_photos_are_real_decodable_photos_in_fixed_order():
  src = sample_photos.SamplePhotosSource()
  keys = [src[i]["key"] for i in range(len(src))]
  assert len(keys) >= 3 and len(set(keys)) == len(keys)
  known = [f"{p}/{os.path.basename(r)}" for p, r in sample_photos.SAMPLE_PHOTOS]
  assert keys == [k for k in known if k in keys]
  for i in range(len(src)):
    img = decode.decode_image(src[i]["image_bytes"])
    assert img.mode == "RGB" and min(img.size) >= 256
    assert np.asarray(img).std() > 20  # A photo, not a flat test pattern.
  one = sample_photos.SamplePhotosSource(["skimage/astronaut.png"])
  assert len(one) == 1 and decode.decode_image(one[0]["image_bytes"]).size == (512, 512)
  with pytest.raises(FileNotFoundError, match="not available"):
    sample_photos.SamplePhotosSource(["skimage/nope.png"])
