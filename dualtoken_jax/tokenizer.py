"""`DualTokenizer`: the public, ready-to-use DualToken tokenizer (weights + jitted methods).

    tok = DualTokenizer.from_reference("checkpoint.pt", "config.json")
    codes = tok.encode(images)              # DualTokens(pixel=(B,h,w,D), semantic=(B,h,w,D))
    images_hat = tok.decode(codes.pixel)

Images are (B, H, W, 3): float32 in [-1, 1], or uint8 (converted). Codes are int32, depth last,
raster order over the patch grid. Nothing is ever downloaded: every loader takes a local path.
"""

from __future__ import annotations

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dualtoken_jax.bridges import dualtoken as weights
from dualtoken_jax.bridges import layout
from dualtoken_jax.models import config as model_config
from dualtoken_jax.models.dualtoken import DualToken, init_variables


@flax.struct.dataclass
class DualTokens:
  """A batch of DualToken codes: pixel and semantic, each int32 (B, h, w, D)."""
  pixel: jax.Array
  semantic: jax.Array


class DualTokenizer:
  """A DualToken model config plus its variables ({"params", "vq_stats"}), with jitted methods."""

  def __init__(self, config: ml_collections.ConfigDict, variables: dict[str, Any]):
    model_config.validate(config)
    self.config = config
    self.model = DualToken(ml_collections.FrozenConfigDict(config))
    self.variables = layout.to_device(variables)
    m = self.model
    self._encode = jax.jit(lambda v, x: m.apply(v, x, method=DualToken.encode))
    self._decode = jax.jit(lambda v, c: m.apply(v, c, method=DualToken.decode_codes))
    self._decode_levels = jax.jit(
        lambda v, c, k: m.apply(v, c, k, method=DualToken.decode_code_levels))
    self._reconstruct = jax.jit(lambda v, x: m.apply(v, x)["recon"])
    self._code_embeddings = jax.jit(lambda v, p, s: m.apply(v, p, s, method=DualToken.code_embeddings))

  # ---------------------------------------------------------------- constructors
  @classmethod
  def from_config(cls, config, seed: int = 0) -> "DualTokenizer":
    """A randomly initialised tokenizer (SigLIP included) for `config`."""
    model_config.validate(config)
    return cls(config, init_variables(config, jax.random.key(seed)))

  @classmethod
  def from_reference(cls, checkpoint_path: str | os.PathLike,
                     config_json_path: str | os.PathLike | None = None) -> "DualTokenizer":
    """The PyTorch reference's checkpoint (`.pt` `{"state_dict": …}` or `.safetensors`) and its
    config.json (default: `config.json` beside the checkpoint). Strict: every key must match."""
    return cls(*weights.load_reference(checkpoint_path, config_json_path))

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike) -> "DualTokenizer":
    """This project's own format, as written by `save` (config.json + Orbax `state/`)."""
    return cls(*weights.load_saved(path))

  @classmethod
  def from_training_run(cls, path: str | os.PathLike) -> "DualTokenizer":
    """The tokenizer of a `dualtoken_jax.train` run (its newest checkpoint, or the step
    directory `path`): params and EMA codebooks, without optimiser, teacher or discriminator."""
    return cls(*weights.load_training_run(path))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "DualTokenizer":
    """A `save`d tokenizer directory, or a tokenizer training run (workdir or step directory)."""
    return cls(*weights.load(path))

  @classmethod
  def from_siglip(cls, config, siglip_path: str | os.PathLike, seed: int = 0) -> "DualTokenizer":
    """A new tokenizer whose SigLIP towers come from real weights and everything DualToken adds
    is randomly initialised: the starting point of training. `siglip_path`: a Hugging Face
    SigLIP directory / `.safetensors`, or a big_vision `.npz` (optionally `file.npz:img`)."""
    return cls(config, weights.init_with_siglip(config, siglip_path, seed))

  # ---------------------------------------------------------------- saving
  def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Writes config.json and an Orbax checkpoint of the variables under `path`."""
    weights.save(path, self.config, self.variables, overwrite)

  def export_reference(self, path: str | os.PathLike,
                       config_json_path: str | os.PathLike | None = None) -> None:
    """Writes the reference layout: `path` (.safetensors) and its config.json (default: beside it)."""
    weights.export_reference(path, self.config, self.variables, config_json_path)

  # ---------------------------------------------------------------- public methods
  @property
  def grid(self) -> int:
    return model_config.grid_size(self.config)

  def encode(self, images) -> DualTokens:
    out = self._encode(self.variables, self._images(images))
    return DualTokens(pixel=out["codes_pix"], semantic=out["codes_sem"])

  def encode_all(self, images) -> dict[str, jax.Array]:
    """Everything the encoder computes (codes, zq_pix, zq_sem, pooled, image_embeds, losses)."""
    return self._encode(self.variables, self._images(images))

  def decode(self, pixel_codes) -> jax.Array:
    """Pixel codes (B, h, w, D) -> images (B, H, W, 3) float32, nominally in [-1, 1]."""
    return self._decode(self.variables, self._codes(pixel_codes, self.config.vq_pix, "pixel"))

  def decode_levels(self, pixel_codes, levels) -> jax.Array:
    """Images decoded from the first `levels` residual levels of the pixel codes (B, h, w, D):
    an int, or one int per image, in [1, D] (D is `decode`). Shows how detail arrives level by
    level; equal to decoding `pixel_codes[..., :k]` (the finer levels left out of the sum)."""
    codes = self._codes(pixel_codes, self.config.vq_pix, "pixel")
    depth = self.config.vq_pix.depth
    levels = np.asarray(levels)
    if not np.issubdtype(levels.dtype, np.integer) or levels.ndim > 1 or (
        levels.ndim == 1 and levels.shape[0] != codes.shape[0]):
      raise ValueError(f"levels must be an int or one int per image ({codes.shape[0]}), got "
                       f"{levels!r}")
    if levels.size and (levels.min() < 1 or levels.max() > depth):
      raise ValueError(f"levels must lie in [1, {depth}] (the pixel depth), got {levels.tolist()}")
    levels = np.broadcast_to(levels, codes.shape[:1]).astype(np.int32)
    return self._decode_levels(self.variables, codes, jnp.asarray(levels))

  def reconstruct(self, images) -> jax.Array:
    return self._reconstruct(self.variables, self._images(images))

  def semantic_features(self, images) -> jax.Array:
    """Post-quant semantic features (B, h*w, width): what replaces block `layer_sem`'s output."""
    return self.encode_all(images)["zq_sem"]

  def image_embedding(self, images) -> jax.Array:
    """L2-normalised MAP-head output (B, width), computed on the quantised semantic path."""
    return self.encode_all(images)["image_embeds"]

  def siglip_embedding(self, images) -> jax.Array:
    """L2-normalised plain SigLIP embedding (B, width): the same tower and MAP head without the
    semantic quantiser (evaluation's unquantised "teacher" path), for comparing with
    `image_embedding`."""
    return self._jitted(DualToken.siglip_embedding)(self.variables, self._images(images))

  def text_embedding(self, token_ids) -> jax.Array:
    """L2-normalised text-tower output (B, text.out_dim) of int token ids (B, L<=text.max_len),
    e.g. from `evaluation.text.SigLIPTokenizer`. Raises ValueError without a text tower."""
    return self._jitted(DualToken.encode_text)(self.variables, self._tokens(token_ids))

  def _jitted(self, method):
    """jit(model.apply(variables, *args, method=method)), compiled once per tokenizer and method."""
    cache = self.__dict__.setdefault("_jit_cache", {})
    if method not in cache:
      model = self.model
      cache[method] = jax.jit(lambda v, *args: model.apply(v, *args, method=method))
    return cache[method]

  def code_embeddings(self, codes: DualTokens) -> tuple[jax.Array, jax.Array]:
    """Sums over depth of the code embeddings: pixel (B,h,w,d), semantic (B,h,w,d)."""
    return self._code_embeddings(self.variables,
                                 self._codes(codes.pixel, self.config.vq_pix, "pixel"),
                                 self._codes(codes.semantic, self.config.vq_sem, "semantic"))

  # ---------------------------------------------------------------- input checks
  def _images(self, images) -> jax.Array:
    size = self.config.image_size
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
      raise TypeError(f"images must be an array (B, {size}, {size}, 3), got {type(images).__name__}")
    if images.ndim != 4 or tuple(images.shape[1:]) != (size, size, 3):
      raise ValueError(f"images must have shape (batch, {size}, {size}, 3) (NHWC RGB at the "
                       f"config's image_size); got {tuple(images.shape)}. Resize/centre-crop first, "
                       "e.g. with dualtoken_jax.data.load_image(path, size).")
    if images.shape[0] == 0:
      raise ValueError("images is an empty batch")
    if images.dtype == np.uint8:
      return jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise TypeError(f"images must be float in [-1, 1] or uint8 in [0, 255]; got dtype {images.dtype}")
    finite, lo, hi = (float(v) for v in jax.device_get(_value_range(images)))
    if not finite:  # min/max alone would not do: on CPU they skip NaNs
      raise ValueError("images contain NaN or infinite values")
    if lo < -1.01 or hi > 1.01:
      raise ValueError(f"float images must lie in [-1, 1] (SigLIP normalisation x/127.5 - 1); got "
                       f"values in [{lo:.3g}, {hi:.3g}]. Pass uint8 images or normalise first.")
    return jnp.asarray(images, jnp.float32)

  def _tokens(self, token_ids) -> jax.Array:
    t = self.config.text
    if t is None:
      raise ValueError("this tokenizer has no text tower (config.text is None): text_embedding "
                       "needs a config with one, e.g. a SigLIP checkpoint with its text tower")
    if not hasattr(token_ids, "shape") or not hasattr(token_ids, "dtype"):
      raise TypeError(f"token_ids must be an int array (B, L<={t.max_len}), got "
                      f"{type(token_ids).__name__}")
    if token_ids.ndim != 2 or not 1 <= token_ids.shape[1] <= t.max_len:
      raise ValueError(f"token_ids must have shape (batch, length) with 1 <= length <= "
                       f"{t.max_len} (text.max_len); got {tuple(token_ids.shape)}")
    if token_ids.shape[0] == 0:
      raise ValueError("token_ids is an empty batch")
    return _ids_below(token_ids, t.vocab_size, "token_ids")

  def _codes(self, codes, q, name) -> jax.Array:
    g = self.grid
    expected = (g, g, q.depth)
    if not hasattr(codes, "shape") or codes.ndim != 4 or tuple(codes.shape[1:]) != expected:
      raise ValueError(f"{name} codes must have shape (batch, {g}, {g}, {q.depth}); "
                       f"got {getattr(codes, 'shape', type(codes).__name__)}")
    return _ids_below(codes, q.codebook_size, f"{name} codes")


@jax.jit
def _value_range(x) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(all values finite, min, max) of `x`, in one pass on the device."""
  return jnp.all(jnp.isfinite(x)), jnp.min(x), jnp.max(x)


def _ids_below(ids, size: int, what: str) -> jax.Array:
  """`ids` as int32, raising unless they are integers in [0, size)."""
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"{what} must be integers, got dtype {ids.dtype}")
  lo, hi = int(jnp.min(ids)), int(jnp.max(ids))
  if lo < 0 or hi >= size:
    raise ValueError(f"{what} must lie in [0, {size}); got [{lo}, {hi}]")
  return jnp.asarray(ids, jnp.int32)
