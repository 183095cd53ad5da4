"""The PyTorch reference tokenizer's checkpoints and config.json <-> this project's trees.

Every quirk of the reference layout lives here:
* the state dict may be wrapped (`{"state_dict": ...}`) and DDP-prefixed (`module.`);
* SigLIP sits under `siglip_model.` in Hugging Face names (see `bridges/siglip.py`);
* each AttnProjection carries a fixed all-zero `attn.zero_k_bias` buffer;
* a shared codebook appears once per depth (`codebooks.{i}`), as K+1 rows (a zero padding row),
  with its EMA buffers `cluster_size_ema` / `embed_ema` -> our `vq_stats` collection;
* decoder levels are `up.{i}.block.{j}` / `up.{i}.attn.{j}` (ours: `up_{i}/block_{j}`).
Flat paths on our side are prefixed by collection: "params/…" or "vq_stats/…".
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Mapping

import numpy as np

from dualtoken_jax.models import config as model_config
from dualtoken_jax.bridges import rules as R
from dualtoken_jax.bridges import siglip

_BOTTLENECKS = {"rq": "per_level", "rq_ema": "pooled"}
_PROJECTIONS = ("prequant_pix", "prequant_shortcut", "prequant_sem", "postquant_pix", "postquant_sem")

# Released reference configs name their backbone instead of embedding its config.
KNOWN_BACKBONES = {
    "google/siglip2-so400m-patch14-384": dict(variant="So400m", patch=14, image_size=384, vocab=256000),
    "google/siglip2-so400m-patch16-256": dict(variant="So400m", patch=16, image_size=256, vocab=256000),
    "google/siglip-so400m-patch14-384": dict(variant="So400m", patch=14, image_size=384, vocab=32000),
    "google/siglip-large-patch16-256": dict(variant="L", patch=16, image_size=256, vocab=32000),
}


# ---------------------------------------------------------------- config.json
def config_from_reference(ref: Mapping) -> "ml_collections.ConfigDict":  # noqa: F821
  """The reference's config.json (its `siglip` entry, or a known `pretrained_model`) -> ours."""
  vision, text, image_size = _backbone(ref)
  dd = ref["ddconfig"]
  if dd.get("resolution", image_size) != image_size:
    raise ValueError(f"ddconfig.resolution {dd['resolution']} differs from the SigLIP image size {image_size}")
  config = model_config.tokenizer_config(
      vision=vision, text=text, image_size=image_size,
      layer_recon=ref["layer_recon"], layer_sem=ref["layer_sem"],
      layer_shortcut=ref.get("layer_shortcut"), weight_shortcut=ref.get("weight_shortcut", 0.0),
      vq_pix=_quantizer_from_reference(ref["vq_pix"], "vq_pix"),
      vq_sem=_quantizer_from_reference(ref["vq_sem"], "vq_sem"),
      decoder=model_config.decoder_config(ch=dd["ch"], ch_mult=dd["ch_mult"],
                                          attn_resolutions=dd["attn_resolutions"],
                                          in_channels=dd["decoder_in_channels"]),
      decoder_latent_shape=ref.get("decoder_latent_shape"))
  config.decoder.num_res_blocks = dd["num_res_blocks"]
  config.decoder.out_ch = dd.get("out_ch", 3)
  config.decoder.dropout = dd.get("dropout", 0.0)
  model_config.validate(config)
  return config


def _backbone(ref):
  if "siglip" in ref:
    sig = ref["siglip"]
    vc = sig["vision_config"]
    text = siglip.text_config_from_hf(sig["text_config"]) if sig.get("text_config") else None
    return siglip.vision_config_from_hf(vc), text, vc["image_size"]
  name = ref.get("pretrained_model")
  if name not in KNOWN_BACKBONES:
    raise ValueError(f"config has no 'siglip' entry and an unknown pretrained_model {name!r}; "
                     f"known: {sorted(KNOWN_BACKBONES)}")
  b = KNOWN_BACKBONES[name]
  vision = model_config.vit_config(b["variant"], b["patch"])
  text = model_config.text_config(width=vision.width, depth=vision.depth, mlp_dim=vision.mlp_dim,
                                  num_heads=vision.num_heads, vocab_size=b["vocab"], max_len=64)
  return vision, text, b["image_size"]


def _quantizer_from_reference(q: Mapping, name: str):
  if q.get("bottleneck_type") not in _BOTTLENECKS:
    raise ValueError(f"{name}.bottleneck_type must be one of {sorted(_BOTTLENECKS)}, got {q.get('bottleneck_type')!r}")
  if not q.get("shared_codebook", True):
    raise ValueError(f"{name}: only shared codebooks (shared_codebook=true, as in every released "
                     "DualToken config) are supported")
  if list(q["latent_shape"][:2]) != list(q["code_shape"][:2]):
    raise ValueError(f"{name}: latent_shape {q['latent_shape']} and code_shape {q['code_shape']} "
                     "differ spatially; spatially grouped codes are not supported")
  out = model_config.quantizer_config(codebook_size=q["n_embed"], embed_dim=q["embed_dim"],
                                      depth=q["code_shape"][-1], ema_update=_BOTTLENECKS[q["bottleneck_type"]])
  out.decay = q.get("decay", 0.99)
  out.restart_unused_codes = q.get("restart_unused_codes", True)
  return out


def config_to_reference(config) -> dict:
  """Our config -> the reference's config.json layout (with the SigLIP config embedded)."""
  g = model_config.grid_size(config)
  v = config.vision
  def vq(q):
    kind = {u: k for k, u in _BOTTLENECKS.items()}[q.ema_update]
    return dict(bottleneck_type=kind, n_embed=q.codebook_size, embed_dim=q.embed_dim, decay=q.decay,
                code_shape=[g, g, q.depth], latent_shape=[g, g, q.embed_dim], shared_codebook=True,
                restart_unused_codes=q.restart_unused_codes, ckpt_path=None)
  vision = dict(hidden_size=v.width, num_hidden_layers=v.depth, intermediate_size=v.mlp_dim,
                num_attention_heads=v.num_heads, patch_size=v.patch_size, image_size=config.image_size,
                layer_norm_eps=v.layer_norm_eps, num_channels=3, hidden_act="gelu_pytorch_tanh",
                model_type="siglip_vision_model")
  sig = dict(model_type="siglip", vision_config=vision)
  if config.text is not None:
    t = config.text
    sig["text_config"] = dict(hidden_size=t.width, num_hidden_layers=t.depth, intermediate_size=t.mlp_dim,
                              num_attention_heads=t.num_heads, vocab_size=t.vocab_size,
                              max_position_embeddings=t.max_len, projection_size=t.out_dim,
                              layer_norm_eps=t.layer_norm_eps, model_type="siglip_text_model")
  d = config.decoder
  return dict(
      hidden_size=v.width, layer_recon=config.layer_recon, layer_sem=config.layer_sem,
      layer_shortcut=config.layer_shortcut, weight_shortcut=config.weight_shortcut,
      ddconfig=dict(ch=d.ch, ch_mult=list(d.ch_mult), num_res_blocks=d.num_res_blocks,
                    attn_resolutions=list(d.attn_resolutions), decoder_in_channels=d.in_channels,
                    out_ch=d.out_ch, dropout=d.dropout, resolution=config.image_size,
                    in_channels=3, double_z=False),
      decoder_latent_shape=None if config.decoder_latent_shape is None else list(config.decoder_latent_shape),
      vq_pix=vq(config.vq_pix), vq_sem=vq(config.vq_sem), pretrained_model="siglip", siglip=sig)


# ---------------------------------------------------------------- state dict
_UP = re.compile(r"/up_(\d+)/(block|attn)_(\d+)/")
_UPSAMPLE = re.compile(r"/up_(\d+)/upsample/")


def _module_rule(path: str, shape: tuple) -> R.Rule:
  """Rule for a leaf of our DualToken-specific modules (projections, post_quant_conv, decoder)."""
  module, _, leaf = path.rpartition("/")
  torch = _UPSAMPLE.sub(r"/up/\1/upsample/", _UP.sub(r"/up/\1/\2/\3/", "/" + module))[1:]
  torch = torch.replace("/", ".")
  ours = "params/" + path
  if leaf == "kernel":
    return (R.conv if len(shape) == 4 else R.linear)(f"{torch}.weight", ours)
  name = {"scale": "weight"}.get(leaf, leaf)
  return R.one(f"{torch}.{name}", ours)


def state_dict_rules(config, params_shapes: Mapping[str, tuple]) -> list[R.Rule]:
  """The full rule table for `config`; `params_shapes` = our loop-layout params (path -> shape)."""
  rules = [dataclasses.replace(r, ours=tuple("params/" + p for p in r.ours))
           for r in siglip.siglip_rules(config, "siglip_model.")]
  own = ("prequant_", "postquant_", "post_quant_conv/", "decoder/")
  rules += [_module_rule(p, s) for p, s in params_shapes.items() if p.startswith(own)]
  for m in _PROJECTIONS:
    if f"{m}/attn/q_bias" in params_shapes:
      rules.append(R.zero_buffer(f"{m}.attn.zero_k_bias", params_shapes[f"{m}/attn/q_bias"][0]))
  for branch in ("pix", "sem"):
    q = config[f"vq_{branch}"]
    stats = f"vq_stats/quantizer_{branch}/"
    for level in range(q.depth):
      t = f"quantizer_{branch}.codebooks.{level}."
      rules += [R.one(f"{t}weight", stats + "codebook", _drop_padding_row(t), _add_padding_row),
                R.one(f"{t}cluster_size_ema", stats + "cluster_size"),
                R.one(f"{t}embed_ema", stats + "embed_sum")]
  return rules


def _drop_padding_row(key):
  def drop(a):
    if a.ndim == 2 and np.any(a[-1] != 0):
      logging.warning("%s: the padding row (index K) is not zero; it is never used and is dropped", key)
    return a[:-1]
  return drop


def _add_padding_row(a):
  return np.concatenate([a, np.zeros((1, a.shape[1]), a.dtype)])


def import_state_dict(tensors: Mapping[str, np.ndarray], config,
                      expected: Mapping[str, tuple]) -> dict[str, np.ndarray]:
  """Reference state dict -> our flat "params/…", "vq_stats/…" arrays (loop layout), strictly."""
  tensors = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in tensors.items()}
  params_shapes = {p[len("params/"):]: s for p, s in expected.items() if p.startswith("params/")}
  rules = state_dict_rules(config, params_shapes)
  return R.import_tensors(tensors, rules, expected, "reference checkpoint")


def export_state_dict(flat: Mapping[str, np.ndarray], config) -> dict[str, np.ndarray]:
  params_shapes = {p[len("params/"):]: v.shape for p, v in flat.items() if p.startswith("params/")}
  return R.export_tensors(flat, state_dict_rules(config, params_shapes))
