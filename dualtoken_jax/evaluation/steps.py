"""The device side of an evaluation: the mesh, the jitted per-batch step, host image round trips.

Jitted functions run per batch, sharded over every device of every host (batch split over
the mesh axes ('data', 'fsdp'), weights replicated):

  main_step     encode (+ decode) -> per-image PSNR / SSIM, code histograms (masked, global
                sums), image embeddings of the quantised and unquantised (teacher) semantic
                paths, zero-shot top-k class ids;
  lpips_step    LPIPS of input and reconstruction;
  features_step Inception pool3 features of input and reconstruction (both as 8-bit images).

Inputs are the pipeline's images in [-1, 1] (uint8 / 127.5 − 1, so exactly 8-bit levels).
Image metrics compare x01 = (x + 1) / 2 with y01 = clamp(decoder(x̂), −1, 1) mapped to
[0, 1] (the reference's mapping, `data.images.to_unit`). For rFID both sides are 8-bit
images, as files on disk would be: the reconstruction is rounded to uint8 first.

rFID resize options (`fid_resize`):
  "bilinear"    299×299 bilinear inside the jitted step (pytorch-fid's `resize_input`);
  "pil_bicubic" 299×299 with PIL bicubic on float channels on the host (clean-fid's "clean"
                mode, the reference's tool);
  "none"        features at the image resolution (≥ 75 px): fast smoke tests only, not
                comparable with published numbers.
With `jpeg_quality` both sides are also JPEG-encoded and decoded on the host (PIL, 4:2:0
chroma subsampling like OpenCV's default) before the resize, as the reference saves them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from dualtoken_jax.data import global_batch
from dualtoken_jax.data.images import to_uint8, to_unit
from dualtoken_jax.metrics import codebook_stats, image_quality
from dualtoken_jax.models import inception
from dualtoken_jax.models import lpips as lpips_lib
from dualtoken_jax.models.dualtoken import DualToken

FID_RESIZE = ("bilinear", "pil_bicubic", "none")


def canonical_model(config) -> DualToken:
  """The model of a tokenizer config, built from its JSON form: configs that serialise alike
  (e.g. one read back from a checkpoint's config.json) give equal modules, so the compiled
  steps cached on the module are reused."""
  plain = json.loads(config.to_json_best_effort(sort_keys=True))
  return DualToken(ml_collections.FrozenConfigDict(ml_collections.ConfigDict(plain)))


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What the main jitted step computes (hashable: it keys the compiled-step cache). LPIPS
  and Inception run as separate jitted functions on its device outputs, so adding or
  dropping them does not recompile the tokenizer."""
  recon: bool = True          # decode; PSNR (always with recon)
  ssim: bool = False
  usage: bool = False
  embeds: bool = False        # image embeddings, quantised and teacher
  topk: int = 0               # zero-shot: class ids of the top-k scores (0 = off)


def inception_module(fid_resize: str) -> inception.FIDInceptionV3:
  if fid_resize not in FID_RESIZE:
    raise ValueError(f"fid_resize must be one of {FID_RESIZE}, got {fid_resize!r}")
  return inception.FIDInceptionV3(resize_input=fid_resize == "bilinear")


@functools.lru_cache(maxsize=8)
def main_step(model: DualToken, spec: StepSpec, mesh: Mesh):
  """jit(fn(tok_vars, classifier, images, mask) -> outputs), see the module docstring.

  Outputs (batch-sharded unless noted): "recon" (clamped to [-1, 1]), "psnr", "ssim",
  "hist_pix"/"hist_sem" (replicated global sums over the masked batch), "emb_q"/"emb_t",
  "topk_q"/"topk_t".
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def step(tok_vars, classifier, images, mask):
    out = {}
    enc = model.apply(tok_vars, images) if spec.recon else model.apply(
        tok_vars, images, method=DualToken.encode)
    if spec.recon:
      recon = jnp.clip(enc["recon"], -1.0, 1.0)
      x01, y01 = to_unit(images), to_unit(recon)
      out["recon"] = recon
      out["psnr"] = image_quality.psnr(x01, y01, validate=False)
      if spec.ssim:
        out["ssim"] = image_quality.ssim(x01, y01, validate=False)
    if spec.usage:
      keep = mask[:, None, None, None]
      for name, q in (("pix", model.config.vq_pix), ("sem", model.config.vq_sem)):
        codes = jnp.where(keep, enc[f"codes_{name}"], -1)  # padding rows are not counted
        out[f"hist_{name}"] = codebook_stats.histogram_jax(codes, q.codebook_size)
    if spec.embeds:
      out["emb_q"] = enc["image_embeds"]
      out["emb_t"] = model.apply(tok_vars, images, method=DualToken.siglip_embedding)
      if spec.topk:
        for path in ("q", "t"):
          out[f"topk_{path}"] = jax.lax.top_k(out[f"emb_{path}"] @ classifier.T, spec.topk)[1]
    return out

  names = _output_names(spec)
  return jax.jit(step, out_shardings={
      n: replicated if n.startswith("hist_") else global_batch.batch_sharding(mesh) for n in names})


def _output_names(spec: StepSpec) -> list[str]:
  names = ["recon", "psnr"] + ["ssim"] * spec.ssim if spec.recon else []
  names += ["hist_pix", "hist_sem"] if spec.usage else []
  if spec.embeds:
    names += ["emb_q", "emb_t"] + (["topk_q", "topk_t"] if spec.topk else [])
  return names


@functools.lru_cache(maxsize=4)
def eight_bit_step(mesh: Mesh):
  """jit(fn(images, recon) -> (x, y)): both sides as 8-bit levels / 255, for Inception."""
  def quantise(images, recon):
    return tuple(to_uint8(z).astype(jnp.float32) / 255.0 for z in (images, recon))
  return jax.jit(quantise, out_shardings=(global_batch.batch_sharding(mesh), global_batch.batch_sharding(mesh)))


@functools.lru_cache(maxsize=4)
def features_step(fid_resize: str, mesh: Mesh):
  """jit(fn(inception_vars, images01 (B, H, W, 3)) -> (B, 2048)) pool3 features."""
  net = inception_module(fid_resize)
  return jax.jit(lambda v, x: net.apply(v, x), out_shardings=global_batch.batch_sharding(mesh))


@functools.lru_cache(maxsize=4)
def lpips_step(mesh: Mesh):
  """jit(fn(lpips_params, images, recon) -> (B,)) LPIPS of input and clamped reconstruction."""
  net = lpips_lib.LPIPS()
  return jax.jit(lambda p, x, y: net.apply({"params": p}, x, y), out_shardings=global_batch.batch_sharding(mesh))


def replicate(tree, mesh: Mesh):
  """Copies a pytree onto every device of `mesh` (None leaves stay None)."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def local_rows(x: jax.Array) -> np.ndarray:
  """This host's rows of a batch-sharded global array, in its local batch order."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = {}
  for s in x.addressable_shards:
    shards.setdefault(s.index[0].start or 0, s.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def replicated_value(x: jax.Array) -> np.ndarray:
  return np.asarray(x.addressable_data(0))


# ---------------------------------------------------------------- host image round trips
def jpeg_roundtrip(image_u8: np.ndarray, quality: int) -> np.ndarray:
  """Encode + decode one (H, W, 3) uint8 image as JPEG (PIL/libjpeg, 4:2:0)."""
  buf = io.BytesIO()
  Image.fromarray(image_u8).save(buf, format="JPEG", quality=int(quality), subsampling="4:2:0")
  buf.seek(0)
  return np.asarray(Image.open(buf).convert("RGB"))


def clean_resize(image_u8: np.ndarray, size: int = inception.FID_SIZE) -> np.ndarray:
  """clean-fid's "clean" resize: each channel as a float PIL image, bicubic to size×size,
  clipped to [0, 255]. Returns float32 (size, size, 3) in [0, 1]."""
  chans = []
  for c in range(3):
    img = Image.fromarray(image_u8[..., c].astype(np.float32), mode="F")
    chans.append(np.asarray(img.resize((size, size), resample=Image.BICUBIC)).clip(0, 255))
  return np.stack(chans, axis=-1).astype(np.float32) / 255.0


def prepare_fid_images(images_u8: np.ndarray, jpeg_quality: int | None, fid_resize: str,
                       pool: concurrent.futures.Executor | None = None) -> np.ndarray:
  """The host path: optional JPEG round trip, optional PIL bicubic resize -> float32 [0, 1]."""
  def one(img):
    if jpeg_quality is not None:
      img = jpeg_roundtrip(img, jpeg_quality)
    if fid_resize == "pil_bicubic":
      return clean_resize(img)
    return img.astype(np.float32) / 255.0
  results = list(pool.map(one, images_u8)) if pool else [one(i) for i in images_u8]
  return np.stack(results)
