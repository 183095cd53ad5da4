"""Configs of the text decoder family: released sizes, tiny test models, HF config import.

A decoder config is an `ml_collections.ConfigDict`. One architecture serves Gemma 1/2/3,
Qwen2/Qwen2.5 and Llama 2/3; what differs between them is data (`FAMILY_DEFAULTS`): the norm
style (`norm_offset`: Gemma's `1 + w` or plain `w`), embedding scaling, the MLP activation
(GeGLU or SwiGLU), q/k/v biases, tied or untied output embeddings, RoPE bases and scaling
(linear, or `rope_llama3`), and the per-layer sliding-window pattern. `get_config(variant)`
returns the released sizes (Gemma numbers from the official gm/big_vision configs; Qwen2.5 and
Llama from their HF configs), `config_from_hf` reads a Hugging Face `config.json` (Gemma,
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
from dualtoken_jax.models.config import REMAT_POLICIES

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
  for name in ("dtype", "param_dtype"):
    _check(config[name] in ("float32", "bfloat16", "float16"),
           f"{name} must be float32, bfloat16 or float16, got {config[name]!r}")


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


# ---------------------------------------------------------------- Hugging Face config.json
_HF_TEXT_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}
_HF_ARCH = {"gemma": ("GemmaForCausalLM", "gemma"), "gemma2": ("Gemma2ForCausalLM", "gemma2"),
            "gemma3": ("Gemma3ForCausalLM", "gemma3_text"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
            "llama": ("LlamaForCausalLM", "llama")}
_HF_LAYER_TYPES = {"sliding_attention": LOCAL, "full_attention": GLOBAL}


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ml_collections.ConfigDict:
  """A decoder config from a HF `config.json` dict (Gemma, Gemma 2, Gemma 3 text or multimodal;
  Qwen2 / Qwen2.5; Llama 2 / 3), the family picked from `model_type` (or `architectures`).

  Everything is read from the file; HF's defaults fill only optional fields it omits.
  `overrides` (e.g. dtype="bfloat16", scan_layers=True) are applied last.
  """
  if hf.get("model_type") == "gemma3" and "text_config" in hf:  # Gemma3ForConditionalGeneration
    top = hf
    hf = {"model_type": "gemma3_text", **hf["text_config"]}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the top level's win
      if top.get(key) is not None:
        hf[key] = top[key]
  model_type = hf_model_type(hf)
  required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size")
  missing = [k for k in required if hf.get(k) is None]
  if missing:
    raise ConfigError(f"HF config ({model_type}) lacks required fields {missing}")
  if model_type in _HF_ROTATE_HALF_TYPES:
    return _rotate_half_config_from_hf(hf, model_type, overrides)
  family = _HF_TEXT_TYPES[model_type]
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  if act not in ("gelu_pytorch_tanh", "gelu"):  # HF runs Gemma's "gelu" as the tanh form too
    raise ConfigError(f"hidden_activation {act!r} is not supported (Gemma uses gelu_pytorch_tanh)")
  if hf.get("attention_bias"):
    raise ConfigError("attention_bias=true is not supported: Gemma attention has no biases")
  if hf.get("tie_word_embeddings") is False:
    raise ConfigError("tie_word_embeddings=false is not supported: Gemma ties input and output "
                      "embeddings")
  heads, width = hf["num_attention_heads"], hf["hidden_size"]
  head_dim = hf.get("head_dim") or width // heads
  fields = dict(
      family=family, vocab_size=hf["vocab_size"], width=width, depth=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
      mlp_dim=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or head_dim),
      attn_logit_softcap=_optional_float(hf.get("attn_logit_softcapping")),
      final_logit_softcap=_optional_float(hf.get("final_logit_softcapping")),
      checkpoint_vocab_padding=0,
  )
  fields.update(_hf_ids(hf))
  fields.update(_hf_attention(hf, family))
  fields.update(_hf_rope(hf, family))
  if family == "gemma":  # Gemma 1 has none of these knobs; ignore stray fields
    fields.update(attn_logit_softcap=None, final_logit_softcap=None,
                  query_pre_attn_scalar=float(head_dim))
  fields.update(overrides)
  return gemma_config(**fields)


def hf_model_type(hf: Mapping[str, Any]) -> str:
  """The HF `model_type` of a config.json dict (from `architectures` when it lacks one); an
  unsupported one is a ConfigError naming the supported ones."""
  model_type = hf.get("model_type")
  if model_type is None:
    for arch in hf.get("architectures") or ():
      model_type = _HF_TYPE_OF_ARCH.get(arch, model_type)
  supported = sorted(_HF_TEXT_TYPES) + sorted(_HF_ROTATE_HALF_TYPES)
  if model_type not in supported:
    raise ConfigError(f"HF model_type {model_type!r} (architectures "
                      f"{hf.get('architectures')}) is not a supported decoder; supported "
                      f"model_types: {supported} (or 'gemma3' with a text_config)")
  return model_type


# Qwen2 / Qwen2.5 and Llama 2 / 3: HF model_type -> family.
_HF_ROTATE_HALF_TYPES = {"qwen2": "qwen2", "llama": "llama"}
_HF_TYPE_OF_ARCH = {"GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
                    "Gemma3ForCausalLM": "gemma3_text", "Qwen2ForCausalLM": "qwen2",
                    "LlamaForCausalLM": "llama"}


def _rotate_half_config_from_hf(hf, model_type: str, overrides) -> ml_collections.ConfigDict:
  """Qwen2 / Llama `config.json` -> a decoder config (fields HF hard-codes come from the
  family's defaults: RMSNorm `w`, no embedding scaling, SwiGLU, Qwen2's q/k/v biases)."""
  family = _HF_ROTATE_HALF_TYPES[model_type]
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ConfigError(f"hidden_act {act!r} is not supported ({model_type} uses 'silu')")
  if family == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
    raise ConfigError("attention_bias / mlp_bias = true is not supported for llama (the decoder "
                      "has biases on q/k/v only, as Qwen2)")
  heads, width, depth = hf["num_attention_heads"], hf["hidden_size"], hf["num_hidden_layers"]
  head_dim = hf.get("head_dim") or width // heads
  base = float(hf.get("rope_theta", FAMILY_DEFAULTS[family]["rope_base"]))
  scale, llama3 = _rotate_half_rope_scaling(hf.get("rope_scaling"))
  fields = dict(
      family=family, vocab_size=hf["vocab_size"], width=width, depth=depth, num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
      mlp_dim=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      query_pre_attn_scalar=float(head_dim), rope_base_local=base, rope_base_global=base,
      rope_scale_local=scale, rope_scale_global=scale, rope_llama3=llama3,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)))  # HF's default: untied
  fields.update(_hf_ids(hf))
  fields.update(_qwen_sliding_window(hf, depth))
  fields.update(overrides)
  return gemma_config(**fields)


def _rotate_half_rope_scaling(scaling) -> tuple[float, tuple | None]:
  """(linear scale, rope_llama3) from a HF `rope_scaling` dict."""
  if not scaling:
    return 1.0, None
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return 1.0, None
  if kind == "linear":
    return float(scaling["factor"]), None
  if kind == "llama3":
    return 1.0, (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                 float(scaling["high_freq_factor"]),
                 float(scaling["original_max_position_embeddings"]))
  raise ConfigError(f"rope_scaling type {kind!r} is not supported (only 'linear' and 'llama3')")


def _qwen_sliding_window(hf, depth: int) -> dict:
  """HF Qwen2: layer i uses the window when use_sliding_window and i >= max_window_layers
  (or as `layer_types` lists it)."""
  if hf.get("layer_types"):
    types = tuple(_HF_LAYER_TYPES.get(t, t) for t in hf["layer_types"])
    if len(types) != depth or not set(types) <= {LOCAL, GLOBAL}:
      raise ConfigError(f"layer_types {hf['layer_types']} must list {depth} entries of "
                        f"{sorted(_HF_LAYER_TYPES)}")
  elif hf.get("use_sliding_window") and hf.get("sliding_window"):
    first = hf.get("max_window_layers", depth)
    types = tuple(LOCAL if i >= first else GLOBAL for i in range(depth))
  else:
    types = (GLOBAL,)
  if LOCAL not in types:
    return dict(attention_pattern=(GLOBAL,), sliding_window=None)
  return dict(attention_pattern=_shortest_period(types), sliding_window=hf["sliding_window"])


def _optional_float(v):
  return None if v in (None, 0, 0.0) else float(v)


def _hf_ids(hf) -> dict:
  eos = hf.get("eos_token_id", 1)
  eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
  bos, pad = hf.get("bos_token_id"), hf.get("pad_token_id")
  return dict(bos_id=2 if bos is None else bos, eos_ids=eos, pad_id=0 if pad is None else pad)


def _hf_attention(hf, family) -> dict:
  if family == "gemma":
    return dict(attention_pattern=(GLOBAL,), sliding_window=None)
  window = hf.get("sliding_window") or hf.get("sliding_window_size")
  if hf.get("layer_types"):
    unknown = sorted({t for t in hf["layer_types"] if t not in _HF_LAYER_TYPES})
    if unknown:
      raise ConfigError(f"layer_types has unsupported entries {unknown}; expected "
                        f"{sorted(_HF_LAYER_TYPES)}")
    if len(hf["layer_types"]) != hf["num_hidden_layers"]:
      raise ConfigError(f"layer_types has {len(hf['layer_types'])} entries for "
                        f"num_hidden_layers={hf['num_hidden_layers']}")
    pattern = tuple(_HF_LAYER_TYPES[t] for t in hf["layer_types"])
  elif family == "gemma2":  # HF Gemma 2: even layers (0, 2, ...) slide
    pattern = (LOCAL, GLOBAL)
  else:  # HF Gemma 3: layer i slides unless (i + 1) % sliding_window_pattern == 0
    p = hf.get("sliding_window_pattern") or 6  # HF Gemma3TextConfig default
    pattern = (LOCAL,) * (p - 1) + (GLOBAL,)
  if LOCAL not in pattern:
    window = None
  return dict(attention_pattern=_shortest_period(pattern), sliding_window=window)


def _shortest_period(pattern: tuple[str, ...]) -> tuple[str, ...]:
  for n in range(1, len(pattern) + 1):
    if all(pattern[i] == pattern[i % n] for i in range(len(pattern))):
      return pattern[:n]
  return pattern


def _hf_rope(hf, family) -> dict:
  """RoPE bases/scales from the legacy fields (rope_theta, rope_local_base_freq, rope_scaling)
  or the newer per-layer-type `rope_parameters` dict."""
  params = hf.get("rope_parameters")
  if isinstance(params, Mapping) and ("full_attention" in params or "sliding_attention" in params):
    full = params.get("full_attention") or {}
    slide = params.get("sliding_attention") or full
    base_g = full.get("rope_theta", 1e6 if family == "gemma3" else 1e4)
    return dict(rope_base_global=float(base_g),
                rope_base_local=float(slide.get("rope_theta", 1e4)),
                rope_scale_global=_rope_factor(full), rope_scale_local=_rope_factor(slide))
  if isinstance(params, Mapping) and "rope_theta" in params:  # one dict for all layers
    hf = {**hf, "rope_theta": params["rope_theta"], "rope_scaling": params}
  default_global = 1e6 if family == "gemma3" else 1e4
  base_global = float(hf.get("rope_theta", default_global))
  base_local = float(hf.get("rope_local_base_freq", 1e4)) if family == "gemma3" else base_global
  # HF applies rope_scaling to the global rotary embedding only (Gemma 3's local one is plain).
  return dict(rope_base_global=base_global, rope_base_local=base_local,
              rope_scale_global=_rope_factor(hf.get("rope_scaling")), rope_scale_local=1.0)


def _rope_factor(scaling) -> float:
  if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
    return 1.0
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind != "linear":
    raise ConfigError(f"rope scaling {kind!r} is not supported (only 'linear', as in Gemma 3)")
  return float(scaling["factor"])


def _check_hf_expressible(config) -> None:
  """HF hard-codes per architecture what our config makes optional; refuse what it cannot say."""
  g1 = config.family == "gemma"
  wanted = dict(post_attn_norm=not g1, post_ffw_norm=not g1, qk_norm=config.family == "gemma3",
                rope_scale_local=1.0, rope_llama3=None,
                **_GEMMA)
  if config.family != "gemma3":
    wanted["rope_base_local"] = config.rope_base_global
  if g1:
    wanted.update(attn_logit_softcap=None, final_logit_softcap=None)
  wrong = [f"{k}={config[k]!r} (HF {_HF_ARCH[config.family][0]} needs {v!r})"
           for k, v in wanted.items() if config[k] != v]
  if g1 and LOCAL in layer_types(config):
    wrong.append("local attention layers (HF GemmaForCausalLM has none)")
  if wrong:
    raise ConfigError("config cannot be written as a HF config: " + "; ".join(wrong))


def _rotate_half_config_to_hf(config) -> dict[str, Any]:
  arch, model_type = _HF_ARCH[config.family]
  hard = dict(norm_offset=0.0, scale_embeddings=False, activation="silu", qk_norm=False,
              post_attn_norm=False, post_ffw_norm=False, attn_logit_softcap=None,
              final_logit_softcap=None, query_pre_attn_scalar=float(config.head_dim),
              qkv_bias=config.family == "qwen2", rope_base_local=config.rope_base_global,
              rope_scale_local=config.rope_scale_global)
  wrong = [f"{k}={config[k]!r} (HF {arch} needs {v!r})" for k, v in hard.items() if config[k] != v]
  types = layer_types(config)
  first_local = types.index(LOCAL) if LOCAL in types else config.depth
  if config.family == "llama" and LOCAL in types:
    wrong.append("local attention layers (HF LlamaForCausalLM has none)")
  if any(t != (LOCAL if i >= first_local else GLOBAL) for i, t in enumerate(types)):
    wrong.append(f"attention_pattern {tuple(config.attention_pattern)} (HF {arch} slides on the "
                 "layers from max_window_layers on)")
  if config.rope_llama3 is not None and config.rope_scale_global != 1.0:
    wrong.append("both linear and llama3 RoPE scaling")
  if wrong:
    raise ConfigError("config cannot be written as a HF config: " + "; ".join(wrong))
  scaling = None
  if config.rope_llama3 is not None:
    f, lo, hi, ctx = config.rope_llama3
    scaling = dict(rope_type="llama3", factor=f, low_freq_factor=lo, high_freq_factor=hi,
                   original_max_position_embeddings=int(ctx))
  elif config.rope_scale_global != 1.0:
    scaling = dict(rope_type="linear", factor=config.rope_scale_global)
  hf = dict(
      architectures=[arch], model_type=model_type, vocab_size=config.vocab_size,
      hidden_size=config.width, num_hidden_layers=config.depth,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim, intermediate_size=config.mlp_dim, hidden_act="silu",
      rms_norm_eps=config.norm_eps, rope_theta=config.rope_base_global, rope_scaling=scaling,
      attention_dropout=0.0, bos_token_id=config.bos_id, pad_token_id=config.pad_id,
      eos_token_id=config.eos_ids[0] if len(config.eos_ids) == 1 else list(config.eos_ids),
      max_position_embeddings=32768, tie_word_embeddings=bool(config.tie_embeddings),
      torch_dtype=config.param_dtype)
  if config.family == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  else:
    hf.update(use_sliding_window=LOCAL in types, max_window_layers=first_local,
              sliding_window=config.sliding_window or 4096)
  return hf


def config_to_hf(config) -> dict[str, Any]:
  """The HF `config.json` dict of a `*ForCausalLM` equivalent to `config`."""
  if config.family in _HF_ROTATE_HALF_TYPES.values():
    return _rotate_half_config_to_hf(config)
  arch, model_type = _HF_ARCH[config.family]
  types = layer_types(config)
  _check_hf_expressible(config)
  hf = dict(
      architectures=[arch], model_type=model_type, vocab_size=config.vocab_size,
      hidden_size=config.width, num_hidden_layers=config.depth,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim, intermediate_size=config.mlp_dim,
      hidden_activation="gelu_pytorch_tanh", rms_norm_eps=config.norm_eps,
      rope_theta=config.rope_base_global, attention_bias=False, attention_dropout=0.0,
      bos_token_id=config.bos_id, pad_token_id=config.pad_id,
      eos_token_id=config.eos_ids[0] if len(config.eos_ids) == 1 else list(config.eos_ids),
      max_position_embeddings=8192 if config.family != "gemma3" else 131072,
      tie_word_embeddings=True, torch_dtype=config.param_dtype)
  if config.family == "gemma":
    return hf
  hf.update(query_pre_attn_scalar=config.query_pre_attn_scalar,
            attn_logit_softcapping=config.attn_logit_softcap,
            final_logit_softcapping=config.final_logit_softcap,
            sliding_window=config.sliding_window or 4096,
            layer_types=["sliding_attention" if t == LOCAL else "full_attention" for t in types])
  if config.family == "gemma3":
    pattern = tuple(config.attention_pattern)
    if pattern == (LOCAL,) * (len(pattern) - 1) + (GLOBAL,):
      hf["sliding_window_pattern"] = len(pattern)
    hf.update(rope_local_base_freq=config.rope_base_local,
              rope_scaling=(None if config.rope_scale_global == 1.0 else
                            dict(rope_type="linear", factor=config.rope_scale_global)))
  return hf
