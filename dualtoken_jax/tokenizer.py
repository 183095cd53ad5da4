"""`DualTokenizer`: the public, ready-to-use DualToken tokenizer (weights + jitted methods).

    tok = DualTokenizer.from_reference("checkpoint.pt", "config.json")
    codes = tok.encode(images)              # DualTokens(pixel=(B,h,w,D), semantic=(B,h,w,D))
    images_hat = tok.decode(codes.pixel)

Images are (B, H, W, 3): float32 in [-1, 1], or uint8 (converted). Codes are int32, depth last,
raster order over the patch grid. Nothing is ever downloaded: every loader takes a local path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dualtoken_jax.models import config as model_config
from dualtoken_jax.bridges import flat as F
from dualtoken_jax.bridges import reference
from dualtoken_jax.bridges import rules as R
from dualtoken_jax.bridges import siglip
from dualtoken_jax.bridges.tensor_files import read_tensors, write_safetensors
from dualtoken_jax.models.dualtoken import DualToken, abstract_variables, init_variables
from dualtoken_jax.training import checkpoints


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
    self.variables = F.to_device(variables)
    m = self.model
    self._encode = jax.jit(lambda v, x: m.apply(v, x, method=DualToken.encode))
    self._decode = jax.jit(lambda v, c: m.apply(v, c, method=DualToken.decode_codes))
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
    config_json_path = Path(config_json_path or Path(checkpoint_path).with_name("config.json"))
    if not config_json_path.is_file():
      raise FileNotFoundError(f"reference config.json not found: {config_json_path}")
    config = reference.config_from_reference(json.loads(config_json_path.read_text()))
    abstract = F.flatten(abstract_variables(config))
    expected = R.loop_shapes({k: v.shape for k, v in abstract.items()})
    flat = reference.import_state_dict(read_tensors(checkpoint_path), config, expected)
    flat = F.to_model_layout(flat, config.scan_layers)
    return cls(config, F.unflatten(F.cast_like(flat, abstract)))

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike) -> "DualTokenizer":
    """This project's own format, as written by `save` (config.json + Orbax `state/`)."""
    path = Path(path).absolute()
    if not (path / "config.json").is_file() or not (path / "state").is_dir():
      raise FileNotFoundError(f"{path} is not a saved DualTokenizer (expected config.json and state/)")
    config = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
    abstract = abstract_variables(config)
    variables = ocp.StandardCheckpointer().restore(path / "state", abstract)
    return cls(config, variables)

  @classmethod
  def from_training_run(cls, path: str | os.PathLike) -> "DualTokenizer":
    """The tokenizer of a `dualtoken_jax.train` run (its newest checkpoint, or the step
    directory `path`): params and EMA codebooks, without optimiser, teacher or discriminator."""
    step_dir = checkpoints.latest_step_dir(path)
    config = ml_collections.ConfigDict(checkpoints.read_meta(step_dir)["config"])
    if "model" not in config or "vq_pix" not in config.model:
      raise ValueError(f"{step_dir} is not a tokenizer training checkpoint (its config has no "
                       "model.vq_pix)")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            abstract_variables(config.model))
    return cls(config.model, checkpoints.restore_subtrees(step_dir, {
        "params": abstract["params"], "vq_stats": abstract["vq_stats"]}))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "DualTokenizer":
    """A `save`d tokenizer directory, or a tokenizer training run (workdir or step directory)."""
    if (Path(path) / "config.json").is_file():
      return cls.from_pretrained(path)
    return cls.from_training_run(path)

  @classmethod
  def from_siglip(cls, config, siglip_path: str | os.PathLike, seed: int = 0) -> "DualTokenizer":
    """A new tokenizer whose SigLIP towers come from real weights and everything DualToken adds
    is randomly initialised: the starting point of training. `siglip_path`: a Hugging Face
    SigLIP directory / `.safetensors`, or a big_vision `.npz` (optionally `file.npz:img`)."""
    variables = F.flatten(init_variables(config, jax.random.key(seed)))
    towers = R.loop_shapes({k[len("params/"):]: v.shape for k, v in variables.items()
                            if k.startswith(("params/img/", "params/txt/")) or k in ("params/t", "params/b")})
    if str(siglip_path).split(":")[0].endswith(".npz"):
      loaded = siglip.load_big_vision(str(siglip_path), towers)
    else:
      loaded = siglip.load_hf(siglip_path, config.vision, config.text, towers)
    flat = F.to_loop(variables)
    flat.update({f"params/{k}": v for k, v in loaded.items()})
    flat = F.to_model_layout(flat, config.scan_layers)
    return cls(config, F.unflatten(F.cast_like(flat, variables)))

  # ---------------------------------------------------------------- saving
  def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Writes config.json and an Orbax checkpoint of the variables under `path`."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
      raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "state", self.variables, force=overwrite)
    checkpointer.wait_until_finished()
    (path / "config.json").write_text(self.config.to_json_best_effort(indent=2))

  def export_reference(self, path: str | os.PathLike,
                       config_json_path: str | os.PathLike | None = None) -> None:
    """Writes the reference layout: `path` (.safetensors) and its config.json (default: beside it)."""
    path = Path(path)
    if path.suffix != ".safetensors":
      raise ValueError(f"export_reference writes safetensors; got {path}")
    flat = F.to_loop(F.flatten(F.to_host(self.variables)))
    write_safetensors(path, reference.export_state_dict(flat, self.config))
    cfg_path = Path(config_json_path or path.with_name("config.json"))
    cfg_path.write_text(json.dumps(reference.config_to_reference(self.config), indent=1))

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

  def reconstruct(self, images) -> jax.Array:
    return self._reconstruct(self.variables, self._images(images))

  def semantic_features(self, images) -> jax.Array:
    """Post-quant semantic features (B, h*w, width): what replaces block `layer_sem`'s output."""
    return self.encode_all(images)["zq_sem"]

  def image_embedding(self, images) -> jax.Array:
    """L2-normalised MAP-head output (B, width), computed on the quantised semantic path."""
    return self.encode_all(images)["image_embeds"]

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
    lo, hi = float(jnp.min(images)), float(jnp.max(images))
    if not (np.isfinite(lo) and np.isfinite(hi)):
      raise ValueError("images contain NaN or infinite values")
    if lo < -1.01 or hi > 1.01:
      raise ValueError(f"float images must lie in [-1, 1] (SigLIP normalisation x/127.5 - 1); got "
                       f"values in [{lo:.3g}, {hi:.3g}]. Pass uint8 images or normalise first.")
    return jnp.asarray(images, jnp.float32)

  def _codes(self, codes, q, name) -> jax.Array:
    g = self.grid
    expected = (g, g, q.depth)
    if not hasattr(codes, "shape") or codes.ndim != 4 or tuple(codes.shape[1:]) != expected:
      raise ValueError(f"{name} codes must have shape (batch, {g}, {g}, {q.depth}); "
                       f"got {getattr(codes, 'shape', type(codes).__name__)}")
    if not jnp.issubdtype(codes.dtype, jnp.integer):
      raise TypeError(f"{name} codes must be integers, got dtype {codes.dtype}")
    lo, hi = int(jnp.min(codes)), int(jnp.max(codes))
    if lo < 0 or hi >= q.codebook_size:
      raise ValueError(f"{name} codes must lie in [0, {q.codebook_size}); got [{lo}, {hi}]")
    return jnp.asarray(codes, jnp.int32)
