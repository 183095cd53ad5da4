"""The tokenizer computing in bfloat16 (`model.dtype="bfloat16"`, what the paper configs use)
against float32 on the same (float32) weights, on the bundled sample photos.

Tolerances, from bf16's 8-bit mantissa (relative rounding ~4e-3 per op) on the tiny config:
  * the unquantised SigLIP embedding: cosine >= 0.999 and relative L2 error <= 2%;
  * the quantised-path image embedding: cosine >= 0.99 (a few flipped semantic codes feed it);
  * decoding the same pixel codes: relative L2 error <= 6%;
  * codes: >= 90% of all codes equal (pixel and semantic, every depth), >= 95% at depth 0 —
    a residual nearest-neighbour search flips a code where two codewords are nearly tied, and
    deeper levels quantise smaller residuals, so they flip more often.
Measured (seed 0, 10 photos): 96% / 97% of codes equal, 98% / 99% at depth 0.
"""

import numpy as np
import pytest

from dualtoken_jax import DualTokenizer, config_files
from dualtoken_jax.data import image_inputs


@pytest.fixture(scope="module")
def tokenizers():
  config = config_files.load("configs/dualtoken_tiny.py").model
  f32 = DualTokenizer.from_config(config, seed=0)
  bf16_config = config.copy_and_resolve_references()
  bf16_config.dtype = "bfloat16"
  return f32, DualTokenizer(bf16_config, f32.variables)


@pytest.fixture(scope="module")
def photos(tokenizers):
  items = image_inputs.collect([image_inputs.SAMPLE])
  assert len(items) >= 4, "the sample photos need scikit-image"
  batch = next(image_inputs.batches(items, tokenizers[0].config.image_size, len(items)))
  assert not batch.skipped
  return batch.images


def _cosines(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _relative_error(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.linalg.norm(a - b) / np.linalg.norm(a)


def test_bf16_really_computes_in_bf16(tokenizers, photos):
  f32, bf16 = tokenizers
  assert f32.encode_all(photos[:1])["zq_sem"].dtype == np.float32
  assert bf16.encode_all(photos[:1])["zq_sem"].dtype.name == "bfloat16"


def test_features_agree_within_bf16_precision(tokenizers, photos):
  f32, bf16 = tokenizers
  siglip_32, siglip_16 = f32.siglip_embedding(photos), bf16.siglip_embedding(photos)
  assert _cosines(siglip_32, siglip_16).min() >= 0.999
  assert _relative_error(siglip_32, siglip_16) <= 0.02
  assert _cosines(f32.image_embedding(photos), bf16.image_embedding(photos)).min() >= 0.99
  codes = f32.encode(photos).pixel
  assert _relative_error(f32.decode(codes), bf16.decode(codes)) <= 0.06


@pytest.mark.parametrize("branch", ["pixel", "semantic"])
def test_codes_mostly_identical(tokenizers, photos, branch):
  f32, bf16 = tokenizers
  same = np.asarray(getattr(f32.encode(photos), branch)) == np.asarray(
      getattr(bf16.encode(photos), branch))
  assert same.mean() >= 0.90, f"{branch}: {same.mean():.1%} of codes equal"
  assert same[..., 0].mean() >= 0.95, f"{branch} depth 0: {same[..., 0].mean():.1%} equal"
