"""SigLIP weights into big_vision's tree: Hugging Face safetensors and big_vision `.npz`.

* HF (`SiglipModel` / `SiglipVisionModel` `save_pretrained`): keys with or without the
  `vision_model.` / `text_model.` prefixes; q/k/v reshaped to (D, H, hd), the MAP head's fused
  `in_proj` split into query/key/value, `logit_scale`/`logit_bias` -> `t`/`b`.
* big_vision `.npz`: with or without the `params/` prefix, per-block (`encoderblock_{i}`) or
  stacked (`encoderblock`) layout, bf16-as-void arrays, position embeddings resampled bilinearly
  when the grid differs, and an optional `:img`-style subtree suffix on the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import ml_collections
import numpy as np
import scipy.ndimage

from dualtoken_jax.bridges import layout
from dualtoken_jax.bridges import rules as R
from dualtoken_jax.bridges.tensor_files import CheckpointError, check_tree, read_npz, read_tensors
from dualtoken_jax.models import config as model_config


# ---------------------------------------------------------------- HF rule tables
def _block_rules(t: str, o: str, heads: int) -> list[R.Rule]:
  """One HF encoder layer `t` (…layers.{i}.) <-> one big_vision block `o` (…/encoderblock_{i}/)."""
  a, mha = f"{t}self_attn.", f"{o}MultiHeadDotProductAttention_0/"
  rules = [R.one(f"{t}layer_norm1.weight", f"{o}LayerNorm_0/scale"),
           R.one(f"{t}layer_norm1.bias", f"{o}LayerNorm_0/bias"),
           R.one(f"{t}layer_norm2.weight", f"{o}LayerNorm_1/scale"),
           R.one(f"{t}layer_norm2.bias", f"{o}LayerNorm_1/bias"),
           R.linear(f"{t}mlp.fc1.weight", f"{o}MlpBlock_0/Dense_0/kernel"),
           R.one(f"{t}mlp.fc1.bias", f"{o}MlpBlock_0/Dense_0/bias"),
           R.linear(f"{t}mlp.fc2.weight", f"{o}MlpBlock_0/Dense_1/kernel"),
           R.one(f"{t}mlp.fc2.bias", f"{o}MlpBlock_0/Dense_1/bias"),
           R.heads_out(f"{a}out_proj.weight", f"{mha}out/kernel", heads),
           R.one(f"{a}out_proj.bias", f"{mha}out/bias")]
  for hf, bv in (("q", "query"), ("k", "key"), ("v", "value")):
    rules.append(R.heads_in(f"{a}{hf}_proj.weight", f"{mha}{bv}/kernel", heads))
    rules.append(R.heads_bias(f"{a}{hf}_proj.bias", f"{mha}{bv}/bias", heads))
  return rules


def vision_rules(vision, t: str, o: str = "img/") -> list[R.Rule]:
  """HF `SiglipVisionTransformer` under prefix `t` <-> our `VisionTower` under `o`."""
  h = vision.num_heads
  rules = [R.conv(f"{t}embeddings.patch_embedding.weight", f"{o}embedding/kernel"),
           R.one(f"{t}embeddings.patch_embedding.bias", f"{o}embedding/bias"),
           R.one(f"{t}embeddings.position_embedding.weight", f"{o}pos_embedding",
                 lambda a: a[None], lambda a: a[0]),
           R.one(f"{t}post_layernorm.weight", f"{o}Transformer/encoder_norm/scale"),
           R.one(f"{t}post_layernorm.bias", f"{o}Transformer/encoder_norm/bias")]
  for i in range(vision.depth):
    rules += _block_rules(f"{t}encoder.layers.{i}.", f"{o}Transformer/encoderblock_{i}/", h)
  hd, mha = f"{t}head.", f"{o}MAPHead_0/MultiHeadDotProductAttention_0/"
  qkv = [f"{mha}{n}/" for n in ("query", "key", "value")]
  rules += [
      R.one(f"{hd}probe", f"{o}MAPHead_0/probe"),
      R.fused_qkv(f"{hd}attention.in_proj_weight", [p + "kernel" for p in qkv],
                  lambda a: a.T.reshape(a.shape[1], h, -1), lambda a: a.reshape(a.shape[0], -1).T),
      R.fused_qkv(f"{hd}attention.in_proj_bias", [p + "bias" for p in qkv],
                  lambda a: a.reshape(h, -1), lambda a: a.reshape(-1)),
      R.heads_out(f"{hd}attention.out_proj.weight", f"{mha}out/kernel", h),
      R.one(f"{hd}attention.out_proj.bias", f"{mha}out/bias"),
      R.one(f"{hd}layernorm.weight", f"{o}MAPHead_0/LayerNorm_0/scale"),
      R.one(f"{hd}layernorm.bias", f"{o}MAPHead_0/LayerNorm_0/bias"),
      R.linear(f"{hd}mlp.fc1.weight", f"{o}MAPHead_0/MlpBlock_0/Dense_0/kernel"),
      R.one(f"{hd}mlp.fc1.bias", f"{o}MAPHead_0/MlpBlock_0/Dense_0/bias"),
      R.linear(f"{hd}mlp.fc2.weight", f"{o}MAPHead_0/MlpBlock_0/Dense_1/kernel"),
      R.one(f"{hd}mlp.fc2.bias", f"{o}MAPHead_0/MlpBlock_0/Dense_1/bias")]
  return rules


def text_rules(text, t: str, o: str = "txt/") -> list[R.Rule]:
  """HF `SiglipTextTransformer` under prefix `t` <-> our `TextTower` under `o`."""
  rules = [R.one(f"{t}embeddings.token_embedding.weight", f"{o}Embed_0/embedding"),
           R.one(f"{t}embeddings.position_embedding.weight", f"{o}pos_embedding",
                 lambda a: a[None], lambda a: a[0]),
           R.one(f"{t}final_layer_norm.weight", f"{o}Encoder_0/encoder_norm/scale"),
           R.one(f"{t}final_layer_norm.bias", f"{o}Encoder_0/encoder_norm/bias"),
           R.linear(f"{t}head.weight", f"{o}head/kernel"),
           R.one(f"{t}head.bias", f"{o}head/bias")]
  for i in range(text.depth):
    rules += _block_rules(f"{t}encoder.layers.{i}.", f"{o}Encoder_0/encoderblock_{i}/", text.num_heads)
  return rules


def siglip_rules(config, t: str = "") -> list[R.Rule]:
  """All of a HF `SiglipModel` (prefix `t`, e.g. "siglip_model.") <-> img/, txt/, t, b."""
  rules = vision_rules(config.vision, f"{t}vision_model.")
  if config.text is not None:
    rules += text_rules(config.text, f"{t}text_model.")
  rules += [R.one(f"{t}logit_scale", "t"), R.one(f"{t}logit_bias", "b")]
  return rules


# ---------------------------------------------------------------- HF configs
def vision_config_from_hf(vc: Mapping) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      width=vc["hidden_size"], depth=vc["num_hidden_layers"], mlp_dim=vc["intermediate_size"],
      num_heads=vc["num_attention_heads"], patch_size=vc["patch_size"],
      layer_norm_eps=vc.get("layer_norm_eps", 1e-6)))


def text_config_from_hf(tc: Mapping):
  return model_config.text_config(
      width=tc["hidden_size"], depth=tc["num_hidden_layers"], mlp_dim=tc["intermediate_size"],
      num_heads=tc["num_attention_heads"], vocab_size=tc["vocab_size"],
      max_len=tc["max_position_embeddings"], out_dim=tc.get("projection_size") or tc["hidden_size"])


def load_hf(path: str | Path, vision, text, expected: Mapping[str, tuple]) -> dict[str, np.ndarray]:
  """HF SigLIP weights (a directory with model.safetensors, or the file) -> our flat paths.

  `vision`/`text` are the towers' configs (text may be None); `expected` maps the per-block
  (loop layout) paths wanted under img/, txt/, t, b to their shapes, and the result has exactly
  those. File keys of parts not wanted (e.g. the text tower) are skipped knowingly; any other
  missing, extra or misshaped key is an error.
  """
  path = Path(path)
  file = path / "model.safetensors" if path.is_dir() else path
  tensors = read_tensors(file)
  if any(k.startswith("vision_model.") for k in tensors):  # SiglipModel / SiglipVisionModel
    rules = vision_rules(vision, "vision_model.")
    if text is not None:
      rules += text_rules(text, "text_model.")
    rules += [R.one("logit_scale", "t"), R.one("logit_bias", "b")]
  else:  # a bare vision-tower state dict
    rules = vision_rules(vision, "")
  wanted = [r for r in rules if all(p in expected for p in r.ours)]
  skipped = {k for r in rules for k in r.foreign} - {k for r in wanted for k in r.foreign}
  skip_towers = ("text_model.",) if text is None else ()
  return R.import_tensors(tensors, wanted, expected, f"HF SigLIP {file}",
                          ignore=lambda k: k in skipped or k.startswith(skip_towers),
                          adapt=adapt_posemb)


# ---------------------------------------------------------------- big_vision npz
def load_big_vision(path: str, expected: Mapping[str, tuple]) -> dict[str, np.ndarray]:
  """big_vision SigLIP `.npz` -> our flat paths (img/, txt/, t, b) in loop layout; `expected`
  gives the loop-layout shapes. `path` may end in ":img" (or another subtree) to load only that
  part, as big_vision allows."""
  file, _, subtree = str(path).partition(":")
  flat = read_npz(Path(file))
  if any(k.startswith("params/") for k in flat):
    flat = {k[len("params/"):]: v for k, v in flat.items() if k.startswith("params/")}
  if subtree:
    flat = {f"{subtree}/{k[len(subtree) + 1:]}": v for k, v in flat.items() if k.startswith(subtree + "/")}
    if not flat:
      raise CheckpointError(f"big_vision checkpoint {file}", other=[f"no subtree {subtree!r}"])
  flat = layout.to_loop(flat)
  flat = {k: adapt_posemb(k, v, tuple(expected[k])) if k in expected else v for k, v in flat.items()}
  towers = {p.split("/")[0] for p in expected}
  loaded = {k: v for k, v in flat.items() if k.split("/")[0] in towers}
  if subtree:
    expected = {p: s for p, s in expected.items() if p.startswith(subtree + "/") or p == subtree}
  check_tree(loaded, expected, f"big_vision checkpoint {file}")
  return loaded


def adapt_posemb(path: str, value: np.ndarray, shape: tuple) -> np.ndarray:
  """Resamples the image position embedding when its grid differs from the model's."""
  if path == "img/pos_embedding" and value.ndim == 3 and tuple(value.shape) != shape:
    return resample_posemb(value, shape[1])
  return value


def resample_posemb(posemb: np.ndarray, n_new: int) -> np.ndarray:
  """(1, n_old, D) -> (1, n_new, D) by order-1 zoom of the sqrt(n) x sqrt(n) grid."""
  _, n_old, d = posemb.shape
  g_old, g_new = int(round(n_old ** 0.5)), int(round(n_new ** 0.5))
  if g_old * g_old != n_old or g_new * g_new != n_new:
    raise CheckpointError("position embedding", other=[f"cannot resample non-square grids {n_old} -> {n_new}"])
  grid = posemb.reshape(g_old, g_old, d).astype(np.float32)
  grid = scipy.ndimage.zoom(grid, (g_new / g_old, g_new / g_old, 1), order=1)
  return grid.reshape(1, n_new, d).astype(posemb.dtype)
