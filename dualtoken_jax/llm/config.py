"""Configs of the text decoder family: released sizes, tiny test models, HF config import.

A decoder config is an `ml_collections.ConfigDict`. One architecture serves Gemma 1/2/3,
Qwen2/Qwen2.5 and Llama 2/3; what differs between them is data (`FAMILY_DEFAULTS`): the norm
style (`norm_offset`: Gemma's `1 + w` or plain `w`), embedding scaling, the MLP activation
(GeGLU or SwiGLU), q/k/v biases, tied or untied output embeddings, RoPE bases and scaling
(linear, or `rope_llama3`), and the per-layer sliding-window pattern. `get_config(variant)`
returns the released sizes (Gemma numbers from the official gm/big_vision configs; Qwen2.5 and
Llama from their HF configs; `bridges/hf_config.py` reads and writes their `config.json`: Gemma,
Gemma 2, Gemma 3 text or multimodal, Qwen2, Llama), and `validate` raises `ConfigError` naming
the offending field before anything compiles.

The per-layer attention pattern is data (`attention_pattern`, repeated over the depth), so the
same code serves Gemma 2's local/global alternation, Gemma 3's 5:1 pattern and any HF
`layer_types` list; `layer_schedule` turns it into the per-layer arrays a scanned stack consumes.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np

from dualtoken_jax import config_files
from dualtoken_jax.models.config import ATTENTION_IMPLS, REMAT_POLICIES

LOCAL, GLOBAL = "local", "global"
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3")
FAMILIES = GEMMA_FAMILIES + ("qwen2", "llama")
ACTIVATIONS = ("gelu_tanh", "silu")  # of the gated MLP's gate branch: GeGLU / SwiGLU
# What distinguishes a family, as data (any field may still be overridden per config).
_GEMMA = dict(norm_offset=1.0, scale_embeddings=True, activation="gelu_tanh", qkv_bias=False,
              tie_embeddings=True)
_ROTATE_HALF_LM = dict(norm_offset=0.0, scale_embeddings=False, activation="silu",
                       attention_pattern=("global",), sliding_window=None,
                       checkpoint_vocab_padding=0, bos_id=1, eos_ids=(2,), pad_id=0)
FAMILY_DEFAULTS = {
    "gemma": _GEMMA, "gemma2": _GEMMA, "gemma3": _GEMMA,
    "qwen2": dict(_ROTATE_HALF_LM, qkv_bias=True, tie_embeddings=True, rope_base=1e6),
    "llama": dict(_ROTATE_HALF_LM, qkv_bias=False, tie_embeddings=False, rope_base=1e4,
                  norm_eps=1e-5),
}
# Window given to global layers: "no window" as a number, so scanned layers need no branch.
NO_WINDOW = np.iinfo(np.int32).max


ConfigError = config_files.ConfigError  # the project's one config error


def gemma_config(*, family: str, vocab_size: int, width: int, depth: int, num_heads: int,
                 num_kv_heads: int, head_dim: int, mlp_dim: int,
                 **overrides) -> ml_collections.ConfigDict:
  """A decoder config with the family's defaults; `overrides` set any other field."""
  if family not in FAMILIES:
    raise ConfigError(f"family {family!r} is not one of {FAMILIES}")
  g2, g3 = family == "gemma2", family == "gemma3"
  family_fields = dict(FAMILY_DEFAULTS[family])
  rope_base = family_fields.pop("rope_base", None)
  config = ml_collections.ConfigDict(dict(
      family=family,
      vocab_size=vocab_size,
      width=width,
      depth=depth,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      mlp_dim=mlp_dim,
      norm_eps=1e-6,
      # Layer i is attention_pattern[i % len(attention_pattern)].
      attention_pattern=(LOCAL,) * 5 + (GLOBAL,) if g3 else (LOCAL, GLOBAL) if g2 else (GLOBAL,),
      sliding_window=(512 if g3 else 4096) if (g2 or g3) else None,
      rope_base_local=10_000.0,
      rope_base_global=1_000_000.0 if g3 else 10_000.0,
      rope_scale_local=1.0,
      rope_scale_global=1.0,  # Linear RoPE scaling of global layers (8 for Gemma 3 >= 4B).
      attn_logit_softcap=50.0 if g2 else None,
      final_logit_softcap=30.0 if g2 else None,
      query_pre_attn_scalar=float(head_dim),  # queries are scaled by its inverse square root
      qk_norm=g3,
      post_attn_norm=g2 or g3,
      post_ffw_norm=g2 or g3,
      norm_offset=1.0,          # RMSNorm scales by norm_offset + w (Gemma 1, Qwen2 / Llama 0)
      scale_embeddings=True,    # token embeddings * sqrt(width) (Gemma)
      activation="gelu_tanh",   # gate branch of the gated MLP (ACTIVATIONS)
      qkv_bias=False,           # biases on the q/k/v projections (Qwen2)
      tie_embeddings=True,      # logits from the input table; else `embedder/output_embedding`
      # Llama 3 RoPE frequency scaling: (factor, low_freq_factor, high_freq_factor,
      # original_max_position_embeddings), or None.
      rope_llama3=None,
      # Checkpoint-format facts, used by the Orbax bridge only:
      transpose_gating_einsum=False,   # gm stores mlp/gating_einsum as (2, F, D) (export hint)
      checkpoint_vocab_padding=128 if not g3 else 0,  # trailing pad rows of released tables
      bos_id=2,
      eos_ids=(1,),
      pad_id=0,
      # Execution:
      dtype="float32",        # activations
      param_dtype="float32",
      scan_layers=False,
      remat_policy="none",    # none | full | dots | dots_no_batch
      # "chunked" (the decoder's own einsum attention: the default, the only one with logit
      # soft-capping), "xla", "cudnn" (GPU) or "pallas_tpu" (TPU); see models/attention.py.
      attention_impl="chunked",
      pallas_interpret=False,  # run the Pallas TPU kernel in its interpreter (tests only)
  ))
  if rope_base is not None:
    family_fields.update(rope_base_local=rope_base, rope_base_global=rope_base)
  config.update(family_fields)
  return replace(config, **overrides)


decoder_config = gemma_config  # the defaults of any family in FAMILIES


def _variants() -> dict[str, dict[str, Any]]:
  g1 = dict(family="gemma", vocab_size=256_000)
  g2 = dict(family="gemma2", vocab_size=256_000)
  g3 = dict(family="gemma3", vocab_size=262_144, transpose_gating_einsum=True)
  qwen = dict(family="qwen2", norm_eps=1e-6, bos_id=151_643, eos_ids=(151_645, 151_643),
              pad_id=151_643)
  llama3 = dict(family="llama", vocab_size=128_256, width=4096, depth=32, num_heads=32,
                num_kv_heads=8, head_dim=128, mlp_dim=14336, rope_base_local=5e5,
                rope_base_global=5e5, bos_id=128_000, eos_ids=(128_001, 128_009), pad_id=128_001,
                rope_llama3=(8.0, 1.0, 4.0, 8192))
  return {
      "gemma_2b": dict(g1, width=2048, depth=18, num_heads=8, num_kv_heads=1, head_dim=256,
                       mlp_dim=16384),
      "gemma_7b": dict(g1, width=3072, depth=28, num_heads=16, num_kv_heads=16, head_dim=256,
                       mlp_dim=24576),
      "gemma2_2b": dict(g2, width=2304, depth=26, num_heads=8, num_kv_heads=4, head_dim=256,
                        mlp_dim=9216),
      "gemma2_9b": dict(g2, width=3584, depth=42, num_heads=16, num_kv_heads=8, head_dim=256,
                        mlp_dim=14336, transpose_gating_einsum=True),
      "gemma2_27b": dict(g2, width=4608, depth=46, num_heads=32, num_kv_heads=16, head_dim=128,
                         mlp_dim=36864, query_pre_attn_scalar=4608 / 32,
                         transpose_gating_einsum=True),
      "gemma3_1b": dict(g3, width=1152, depth=26, num_heads=4, num_kv_heads=1, head_dim=256,
                        mlp_dim=6912, sliding_window=512),
      "gemma3_4b": dict(g3, width=2560, depth=34, num_heads=8, num_kv_heads=4, head_dim=256,
                        mlp_dim=10240, sliding_window=1024, rope_scale_global=8.0),
      "gemma3_12b": dict(g3, width=3840, depth=48, num_heads=16, num_kv_heads=8, head_dim=256,
                         mlp_dim=15360, sliding_window=1024, rope_scale_global=8.0),
      "gemma3_27b": dict(g3, width=5376, depth=62, num_heads=32, num_kv_heads=16, head_dim=128,
                         mlp_dim=21504, sliding_window=1024, rope_scale_global=8.0,
                         query_pre_attn_scalar=5376 / 32),
      # Every feature on, small enough for CPU tests: soft-caps, QK-norm, post-norms, two RoPE
      # bases, GQA and a window shorter than the test sequences.
      "tiny": dict(family="gemma3", vocab_size=128, width=64, depth=4, num_heads=4,
                   num_kv_heads=2, head_dim=16, mlp_dim=96, attention_pattern=(LOCAL, GLOBAL),
                   sliding_window=8, attn_logit_softcap=50.0, final_logit_softcap=30.0),
      # Qwen2.5 (HF Qwen/Qwen2.5-*; ids of the instruct models: <|endoftext|>, <|im_end|>).
      "qwen2.5_0.5b": dict(qwen, vocab_size=151_936, width=896, depth=24, num_heads=14,
                           num_kv_heads=2, head_dim=64, mlp_dim=4864),
      "qwen2.5_1.5b": dict(qwen, vocab_size=151_936, width=1536, depth=28, num_heads=12,
                           num_kv_heads=2, head_dim=128, mlp_dim=8960),
      "qwen2.5_3b": dict(qwen, vocab_size=151_936, width=2048, depth=36, num_heads=16,
                         num_kv_heads=2, head_dim=128, mlp_dim=11008),
      "qwen2.5_7b": dict(qwen, vocab_size=152_064, width=3584, depth=28, num_heads=28,
                         num_kv_heads=4, head_dim=128, mlp_dim=18944, tie_embeddings=False),
      # Llama 2 / 3 (HF meta-llama/*).
      "llama2_7b": dict(family="llama", vocab_size=32_000, width=4096, depth=32, num_heads=32,
                        num_kv_heads=32, head_dim=128, mlp_dim=11008, rope_base_local=1e4,
                        rope_base_global=1e4),
      "llama3_8b": dict(llama3, rope_llama3=None),
      "llama3.1_8b": dict(llama3, eos_ids=(128_001, 128_008, 128_009)),
      # Tiny Qwen2 / Llama decoders for CPU tests (the parity fixtures' shapes).
      "tiny_qwen2": dict(family="qwen2", vocab_size=128, width=64, depth=3, num_heads=4,
                         num_kv_heads=2, head_dim=16, mlp_dim=96, norm_eps=1e-6),
      "tiny_llama": dict(family="llama", vocab_size=128, width=64, depth=3, num_heads=4,
                         num_kv_heads=2, head_dim=16, mlp_dim=96),
  }


VARIANTS = tuple(_variants())


def get_config(variant: str = "tiny", **overrides) -> ml_collections.ConfigDict:
  """A released decoder size ("gemma2_2b", "gemma3_4b", "qwen2.5_3b", "llama2_7b", ..., or
  "tiny", "tiny_qwen2", "tiny_llama")."""
  variants = _variants()
  if variant not in variants:
    raise ConfigError(f"unknown decoder variant {variant!r}; expected one of {sorted(variants)}")
  return gemma_config(**{**variants[variant], **overrides})


_REQUIRED = ("family", "vocab_size", "width", "depth", "num_heads", "num_kv_heads", "head_dim",
             "mlp_dim")


def from_dict(saved) -> ml_collections.ConfigDict:
  """A decoder config from its JSON form, merged over its family's current defaults (fields
  added since it was written keep their defaults; JSON lists become tuples), validated."""
  missing = [k for k in _REQUIRED if k not in saved]
  _check(not missing, f"the saved decoder config lacks {', '.join(missing)} (no default)")
  config = config_files.merge_saved(gemma_config(**{k: saved[k] for k in _REQUIRED}), saved)
  validate(config)
  return config


def replace(config, **fields) -> ml_collections.ConfigDict:
  """A validated, mutable copy of `config` (ConfigDict or FrozenConfigDict) with `fields` set."""
  if isinstance(config, ml_collections.FrozenConfigDict):
    new = config.as_configdict()
  else:
    new = config.copy_and_resolve_references()
  for key, value in fields.items():
    if key not in new:
      raise ConfigError(f"unknown config field {key!r}; fields: {sorted(new.keys())}")
    new[key] = value
  validate(new)
  return new


# ---------------------------------------------------------------- derived per-layer values
def layer_types(config) -> tuple[str, ...]:
  """"local"/"global" for each layer."""
  pattern = tuple(config.attention_pattern)
  return tuple(pattern[i % len(pattern)] for i in range(config.depth))


def layer_schedule(config) -> dict[str, np.ndarray]:
  """Per-layer window (NO_WINDOW on global layers), RoPE base and scale, each shape (depth,)."""
  local = np.array([t == LOCAL for t in layer_types(config)])
  window = config.sliding_window if config.sliding_window else NO_WINDOW
  return dict(
      window=np.where(local, window, NO_WINDOW).astype(np.int32),
      rope_base=np.where(local, config.rope_base_local, config.rope_base_global).astype(np.float32),
      rope_scale=np.where(local, config.rope_scale_local,
                          config.rope_scale_global).astype(np.float32),
  )


def uses_qkv_einsum(config) -> bool:
  """Official MHA checkpoints (heads == kv_heads, e.g. Gemma 7B) fuse q, k, v in one einsum."""
  return config.num_heads == config.num_kv_heads


# ---------------------------------------------------------------- validation
def validate(config) -> None:
  """Raises ConfigError naming the first inconsistent field."""
  for name in ("vocab_size", "width", "depth", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
    _check(isinstance(config[name], (int, np.integer)) and config[name] >= 1,
           f"{name} must be a positive integer, got {config[name]!r}")
  _check(config.family in FAMILIES, f"family {config.family!r} is not one of {FAMILIES}")
  _check(config.num_heads % config.num_kv_heads == 0,
         f"num_heads {config.num_heads} must be a multiple of num_kv_heads {config.num_kv_heads}")
  _check(config.head_dim % 2 == 0, f"head_dim {config.head_dim} must be even (RoPE rotates halves)")
  pattern = tuple(config.attention_pattern)
  _check(len(pattern) >= 1 and all(t in (LOCAL, GLOBAL) for t in pattern),
         f"attention_pattern must be a non-empty tuple of {LOCAL!r}/{GLOBAL!r}, got {pattern!r}")
  if LOCAL in layer_types(config):
    _check(isinstance(config.sliding_window, (int, np.integer)) and config.sliding_window >= 1,
           f"attention_pattern has local layers, so sliding_window must be a positive integer, "
           f"got {config.sliding_window!r}")
  for name in ("attn_logit_softcap", "final_logit_softcap"):
    _check(config[name] is None or config[name] > 0,
           f"{name} must be None or > 0, got {config[name]!r}")
  for name in ("rope_base_local", "rope_base_global", "rope_scale_local", "rope_scale_global",
               "query_pre_attn_scalar", "norm_eps"):
    _check(config[name] > 0, f"{name} must be > 0, got {config[name]!r}")
  _check(config.checkpoint_vocab_padding >= 0, "checkpoint_vocab_padding must be >= 0")
  _check(config.activation in ACTIVATIONS,
         f"activation {config.activation!r} is not one of {ACTIVATIONS}")
  _check(config.norm_offset in (0.0, 1.0),
         f"norm_offset must be 0 (scale w) or 1 (Gemma's 1 + w), got {config.norm_offset!r}")
  if config.rope_llama3 is not None:
    r = tuple(config.rope_llama3)
    _check(len(r) == 4 and all(v > 0 for v in r) and r[2] > r[1],
           "rope_llama3 must be (factor, low_freq_factor, high_freq_factor, "
           f"original_max_position_embeddings), all > 0 with high > low, got {r!r}")
  _check(config.remat_policy in REMAT_POLICIES,
         f"remat_policy {config.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
  _check(config.attention_impl in ATTENTION_IMPLS,
         f"attention_impl must be one of {ATTENTION_IMPLS}, got {config.attention_impl!r}")
  _check(config.attention_impl == "chunked" or config.attn_logit_softcap is None,
         f"attention_impl {config.attention_impl!r} has no logit soft-capping: with "
         f"attn_logit_softcap={config.attn_logit_softcap} use attention_impl='chunked'")
  for name in ("dtype", "param_dtype"):
    _check(config[name] in ("float32", "bfloat16", "float16"),
           f"{name} must be float32, bfloat16 or float16, got {config[name]!r}")


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)
