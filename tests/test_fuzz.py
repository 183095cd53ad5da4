"""Property-based fuzzing (hypothesis, bounded examples): every public entry point either gives
its documented result or its documented error — never a crash, a hang or a silent wrong result.

* tokenizer methods: random batch sizes, dtypes, value ranges and NaN/Inf patterns;
* image decoding: random bytes and truncations of real files -> an RGB image or `SkipImage`;
* checkpoint readers: random bytes and truncations of real files -> `CheckpointError` /
  `ValueError` naming the file, never a partial load;
* LLaVA JSONL and caption records: random corruption -> skipped and counted, never raised.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dualtoken_jax import DualTokenizer, config_files
from dualtoken_jax.bridges import tensor_files
from dualtoken_jax.bridges.tensor_files import CheckpointError
from dualtoken_jax.data import decode, sample_photos

FIXTURES = Path(__file__).parent / "fixtures"
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
# Loaders that build a whole model per example: fewer examples, no shrinking (a failure still
# prints the drawn corruption).
FUZZ_LOADERS = settings(FUZZ, max_examples=8, phases=[Phase.explicit, Phase.reuse, Phase.generate])


@pytest.fixture(scope="module")
def tok():
  return DualTokenizer.from_config(config_files.model_of(config_files.load("configs/demo_cpu.py:test")))


@pytest.fixture(scope="module")
def ref_config():
  return DualTokenizer.from_reference(FIXTURES / "dualtoken_ref_a" / "checkpoint.safetensors",
                                      FIXTURES / "dualtoken_ref_a" / "config.json").config


# ---------------------------------------------------------------- tokenizer inputs
_SPECIAL = st.sampled_from([np.nan, np.inf, -np.inf, 1.5, -3.0, 1e30])


@st.composite
def image_batches(draw, size):
  """Mostly well-shaped batches (so the compiled shapes stay few), some with a wrong shape,
  dtype, range or some NaN/Inf pixels."""
  batch = draw(st.integers(1, 2))
  shape = draw(st.sampled_from([(batch, size, size, 3)] * 6 + [
      (batch, size, size), (batch, size + 1, size, 3), (batch, size, size, 4), (0, size, size, 3)]))
  dtype = draw(st.sampled_from([np.float32, np.float32, np.uint8, np.float16, np.int32, np.bool_]))
  rng = np.random.default_rng(draw(st.integers(0, 2**31)))
  x = rng.uniform(-1, 1, shape)
  if dtype == np.uint8:
    x = rng.integers(0, 256, shape)
  if draw(st.booleans()) and x.size:
    n = draw(st.integers(1, 3))
    flat = x.reshape(-1).astype(np.float64)
    for i in rng.integers(0, x.size, n):
      flat[i] = draw(_SPECIAL)
    x = flat.reshape(shape)
  with np.errstate(invalid="ignore", over="ignore"):
    return x.astype(dtype) if dtype != np.uint8 else np.clip(np.nan_to_num(x), 0, 255).astype(dtype)


def _valid(x, size) -> bool:
  if x.ndim != 4 or x.shape[1:] != (size, size, 3) or x.shape[0] == 0:
    return False
  if x.dtype == np.uint8:
    return True
  if not np.issubdtype(x.dtype, np.floating):
    return False
  return bool(np.all(np.isfinite(x)) and x.min() >= -1.01 and x.max() <= 1.01)


@FUZZ
@given(data=st.data())
def test_image_methods_give_the_result_or_the_documented_error(tok, data):
  size = tok.config.image_size
  x = data.draw(image_batches(size))
  method = data.draw(st.sampled_from(["encode", "reconstruct", "image_embedding", "siglip_embedding"]))
  if _valid(x, size):
    out = getattr(tok, method)(x)
    leaves = [out.pixel, out.semantic] if method == "encode" else [out]
    for leaf in leaves:
      leaf = np.asarray(leaf)
      assert leaf.shape[0] == x.shape[0]
      if np.issubdtype(leaf.dtype, np.floating):
        assert np.all(np.isfinite(leaf)), f"{method} returned NaN/Inf on valid input"
  else:
    with pytest.raises((ValueError, TypeError)):
      getattr(tok, method)(x)


@FUZZ
@given(data=st.data())
def test_code_methods_give_the_result_or_the_documented_error(tok, data):
  g, q = tok.grid, tok.config.vq_pix
  batch = data.draw(st.integers(1, 2))
  shape = data.draw(st.sampled_from([(batch, g, g, q.depth)] * 4 + [(batch, g, g), (batch, g + 1, g, q.depth)]))
  dtype = data.draw(st.sampled_from([np.int32, np.int64, np.float32, np.uint8]))
  lo, hi = data.draw(st.sampled_from([(0, q.codebook_size), (-2, q.codebook_size), (0, q.codebook_size + 3)]))
  codes = np.random.default_rng(data.draw(st.integers(0, 2**31))).integers(lo, hi, shape)
  codes = codes.astype(dtype) if dtype != np.uint8 else np.clip(codes, 0, 255).astype(dtype)
  valid = (codes.ndim == 4 and codes.shape[1:] == (g, g, q.depth) and np.issubdtype(codes.dtype, np.integer)
           and codes.min() >= 0 and codes.max() < q.codebook_size)
  method = data.draw(st.sampled_from(["decode", "code_embeddings"]))
  call = (lambda: tok.decode(codes)) if method == "decode" else (
      lambda: tok.code_embeddings(type(tok.encode(np.zeros((1, tok.config.image_size, tok.config.image_size, 3), np.uint8)))(codes, codes)))
  if valid:
    out = call()
    for leaf in (out if isinstance(out, tuple) else (out,)):
      assert np.all(np.isfinite(np.asarray(leaf))) and np.asarray(leaf).shape[0] == batch
  else:
    with pytest.raises((ValueError, TypeError)):
      call()


# ---------------------------------------------------------------- image bytes
def _photo_bytes() -> list[bytes]:
  paths = list(sample_photos.sample_photo_paths().values())[:3]
  return [Path(p).read_bytes() for p in paths]


@FUZZ
@given(data=st.data())
def test_image_decoding_returns_rgb_or_skips(data):
  raw = data.draw(st.sampled_from(_photo_bytes()))
  kind = data.draw(st.sampled_from(["truncate", "flip", "random"]))
  if kind == "truncate":
    raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
  elif kind == "flip":
    b = bytearray(raw)
    for i in data.draw(st.lists(st.integers(0, len(b) - 1), min_size=1, max_size=8, unique=True)):
      b[i] ^= 0xFF
    raw = bytes(b)
  else:
    raw = data.draw(st.binary(max_size=512))
  try:
    img = decode.decode_image(raw)
  except decode.SkipImage as e:
    assert e.reason  # counted under its reason
  else:
    assert img.mode == "RGB" and img.width > 0 and img.height > 0


# ---------------------------------------------------------------- checkpoint files
def _corrupt(raw: bytes, data, header: int = 256) -> bytes:
  """A truncation, flipped bytes within the first `header` bytes, or random bytes."""
  kind = data.draw(st.sampled_from(["truncate", "flip_header", "random"]))
  if kind == "truncate":
    return raw[:data.draw(st.integers(0, len(raw) - 1))]
  if kind == "flip_header":
    b = bytearray(raw)
    for i in data.draw(st.lists(st.integers(0, min(len(b), header) - 1), min_size=1, max_size=4,
                                unique=True)):
      b[i] ^= 0xFF
    return bytes(b)
  return data.draw(st.binary(max_size=1024))


def _corrupt_safetensors(raw: bytes, data) -> bytes:
  """As `_corrupt`, flips confined to the length prefix and the JSON header (a flipped weight
  byte is a different, valid file: only a checksum manifest could tell)."""
  return _corrupt(raw, data, header=8 + int.from_bytes(raw[:8], "little"))


def _assert_named_error(call, path: Path):
  with pytest.raises((CheckpointError, ValueError, FileNotFoundError)) as e:
    call()
  assert path.name in str(e.value), f"the error does not name the file: {e.value}"


@FUZZ_LOADERS
@given(data=st.data())
def test_corrupted_reference_checkpoints_raise_naming_the_file(tmp_path_factory, data):
  src = FIXTURES / "dualtoken_ref_a"
  tmp = tmp_path_factory.mktemp("ref")
  shutil.copy(src / "config.json", tmp / "config.json")
  path = tmp / "checkpoint.safetensors"
  path.write_bytes(_corrupt_safetensors((src / "checkpoint.safetensors").read_bytes(), data))
  _assert_named_error(lambda: DualTokenizer.from_reference(path, tmp / "config.json"), path)


@FUZZ
@given(data=st.data())
def test_corrupted_tensor_files_raise_naming_the_file(tmp_path_factory, data):
  tmp = tmp_path_factory.mktemp("tensors")
  suffix = data.draw(st.sampled_from([".safetensors", ".npz"]))
  good = tmp / f"good{suffix}"
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones((4,), np.int32)}
  if suffix == ".npz":
    tensor_files.write_npz(good, arrays)
  else:
    tensor_files.write_safetensors(good, arrays)
  path = tmp / f"bad{suffix}"
  path.write_bytes(_corrupt(good.read_bytes(), data))
  try:
    loaded = tensor_files.read_tensors(path)
  except (CheckpointError, ValueError) as e:
    assert path.name in str(e), f"the error does not name the file: {e}"
  else:  # a flip that kept the file readable: then it must still be a full, well-formed load
    assert set(loaded) == set(arrays) and all(loaded[k].shape == arrays[k].shape for k in arrays)


@FUZZ_LOADERS
@given(data=st.data())
def test_corrupted_siglip_and_gemma_files_raise_naming_the_file(tmp_path_factory, ref_config, data):
  which = data.draw(st.sampled_from(["siglip", "gemma2", "gemma3"]))
  src = FIXTURES / "dualtoken_ref_a" / "siglip" if which == "siglip" else FIXTURES / "gemma" / which
  tmp = tmp_path_factory.mktemp(which)
  for f in src.iterdir():
    if f.is_file() and f.suffix in (".json", ".safetensors"):
      shutil.copy(f, tmp / f.name)
  weights = sorted(tmp.glob("*.safetensors"))[0]
  weights.write_bytes(_corrupt_safetensors(weights.read_bytes(), data))
  if which == "siglip":
    _assert_named_error(lambda: DualTokenizer.from_siglip(ref_config, tmp), weights)
  else:
    from dualtoken_jax.llm import GemmaLM  # pylint: disable=g-import-not-at-top
    _assert_named_error(lambda: GemmaLM.from_hf(tmp), weights)


# ---------------------------------------------------------------- conversation and caption records
_GOOD = {"id": "x", "image": None,
         "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "a cat"}]}


@FUZZ
@given(data=st.data())
def test_corrupted_llava_jsonl_records_are_skipped_and_counted(tmp_path_factory, data):
  from dualtoken_jax.mllm import data as D  # pylint: disable=g-import-not-at-top
  lines = []
  bad = 0
  for i in range(data.draw(st.integers(2, 6))):
    line = json.dumps({**_GOOD, "id": f"r{i}"})
    if data.draw(st.booleans()):
      kind = data.draw(st.sampled_from(["cut", "garbage", "type", "fields"]))
      if kind == "cut":
        line = line[:data.draw(st.integers(1, len(line) - 2))]
      elif kind == "garbage":
        line = data.draw(st.text(alphabet="{}[]\":,abc0123 ", min_size=1, max_size=40))
      elif kind == "type":
        line = json.dumps(data.draw(st.sampled_from([[1, 2], "text", 3, None])))
      else:
        line = json.dumps({"id": f"r{i}", "image": 3, "conversations": "nope"})
    lines.append(line)
  path = tmp_path_factory.mktemp("llava") / "c.jsonl"
  path.write_text("\n".join(l for l in lines if l.strip()) + "\n")
  if not path.read_text().strip():
    return
  source = D.ConversationSource(path)
  for i in range(len(source)):
    record = source[i]  # never raises
    assert isinstance(record, dict)
    if "skip" in record:
      bad += 1
      assert record["skip"]  # a named reason, counted by the pipeline's skip counters
    else:
      assert isinstance(record["conversations"], list)
  assert bad <= len(source)
