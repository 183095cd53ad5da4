"""Hugging Face `config.json` <-> the decoder config (`llm/config.py`): Gemma 1/2/3 (text or
multimodal), Qwen2/2.5 and Llama 2/3, both ways; an unsupported `model_type` is an error naming
the supported ones. The on-disk side of the decoder config, as `gemma_hf.py` is of its weights."""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np

from dualtoken_jax.llm import config as C

_HF_TEXT_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}
_HF_ARCH = {"gemma": ("GemmaForCausalLM", "gemma"), "gemma2": ("Gemma2ForCausalLM", "gemma2"),
            "gemma3": ("Gemma3ForCausalLM", "gemma3_text"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
            "llama": ("LlamaForCausalLM", "llama")}
_HF_LAYER_TYPES = {"sliding_attention": C.LOCAL, "full_attention": C.GLOBAL}


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
    raise C.ConfigError(f"HF config ({model_type}) lacks required fields {missing}")
  if model_type in _HF_ROTATE_HALF_TYPES:
    return _rotate_half_config_from_hf(hf, model_type, overrides)
  family = _HF_TEXT_TYPES[model_type]
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  if act not in ("gelu_pytorch_tanh", "gelu"):  # HF runs Gemma's "gelu" as the tanh form too
    raise C.ConfigError(f"hidden_activation {act!r} is not supported (Gemma uses gelu_pytorch_tanh)")
  if hf.get("attention_bias"):
    raise C.ConfigError("attention_bias=true is not supported: Gemma attention has no biases")
  if hf.get("tie_word_embeddings") is False:
    raise C.ConfigError("tie_word_embeddings=false is not supported: Gemma ties input and output "
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
  return C.gemma_config(**fields)


def hf_model_type(hf: Mapping[str, Any]) -> str:
  """The HF `model_type` of a config.json dict (from `architectures` when it lacks one); an
  unsupported one is a C.ConfigError naming the supported ones."""
  model_type = hf.get("model_type")
  if model_type is None:
    for arch in hf.get("architectures") or ():
      model_type = _HF_TYPE_OF_ARCH.get(arch, model_type)
  supported = sorted(_HF_TEXT_TYPES) + sorted(_HF_ROTATE_HALF_TYPES)
  if model_type not in supported:
    raise C.ConfigError(f"HF model_type {model_type!r} (architectures "
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
    raise C.ConfigError(f"hidden_act {act!r} is not supported ({model_type} uses 'silu')")
  if family == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
    raise C.ConfigError("attention_bias / mlp_bias = true is not supported for llama (the decoder "
                      "has biases on q/k/v only, as Qwen2)")
  heads, width, depth = hf["num_attention_heads"], hf["hidden_size"], hf["num_hidden_layers"]
  head_dim = hf.get("head_dim") or width // heads
  base = float(hf.get("rope_theta", C.FAMILY_DEFAULTS[family]["rope_base"]))
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
  return C.gemma_config(**fields)


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
  raise C.ConfigError(f"rope_scaling type {kind!r} is not supported (only 'linear' and 'llama3')")


def _qwen_sliding_window(hf, depth: int) -> dict:
  """HF Qwen2: layer i uses the window when use_sliding_window and i >= max_window_layers
  (or as `C.layer_types` lists it)."""
  if hf.get("layer_types"):
    types = tuple(_HF_LAYER_TYPES.get(t, t) for t in hf["layer_types"])
    if len(types) != depth or not set(types) <= {C.LOCAL, C.GLOBAL}:
      raise C.ConfigError(f"layer_types {hf['layer_types']} must list {depth} entries of "
                        f"{sorted(_HF_LAYER_TYPES)}")
  elif hf.get("use_sliding_window") and hf.get("sliding_window"):
    first = hf.get("max_window_layers", depth)
    types = tuple(C.LOCAL if i >= first else C.GLOBAL for i in range(depth))
  else:
    types = (C.GLOBAL,)
  if C.LOCAL not in types:
    return dict(attention_pattern=(C.GLOBAL,), sliding_window=None)
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
    return dict(attention_pattern=(C.GLOBAL,), sliding_window=None)
  window = hf.get("sliding_window") or hf.get("sliding_window_size")
  if hf.get("layer_types"):
    unknown = sorted({t for t in hf["layer_types"] if t not in _HF_LAYER_TYPES})
    if unknown:
      raise C.ConfigError(f"layer_types has unsupported entries {unknown}; expected "
                        f"{sorted(_HF_LAYER_TYPES)}")
    if len(hf["layer_types"]) != hf["num_hidden_layers"]:
      raise C.ConfigError(f"layer_types has {len(hf['layer_types'])} entries for "
                        f"num_hidden_layers={hf['num_hidden_layers']}")
    pattern = tuple(_HF_LAYER_TYPES[t] for t in hf["layer_types"])
  elif family == "gemma2":  # HF Gemma 2: even layers (0, 2, ...) slide
    pattern = (C.LOCAL, C.GLOBAL)
  else:  # HF Gemma 3: layer i slides unless (i + 1) % sliding_window_pattern == 0
    p = hf.get("sliding_window_pattern") or 6  # HF Gemma3TextConfig default
    pattern = (C.LOCAL,) * (p - 1) + (C.GLOBAL,)
  if C.LOCAL not in pattern:
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
    raise C.ConfigError(f"rope scaling {kind!r} is not supported (only 'linear', as in Gemma 3)")
  return float(scaling["factor"])


def _check_hf_expressible(config) -> None:
  """HF hard-codes per architecture what our config makes optional; refuse what it cannot say."""
  g1 = config.family == "gemma"
  wanted = dict(post_attn_norm=not g1, post_ffw_norm=not g1, qk_norm=config.family == "gemma3",
                rope_scale_local=1.0, rope_llama3=None,
                **C._GEMMA)
  if config.family != "gemma3":
    wanted["rope_base_local"] = config.rope_base_global
  if g1:
    wanted.update(attn_logit_softcap=None, final_logit_softcap=None)
  wrong = [f"{k}={config[k]!r} (HF {_HF_ARCH[config.family][0]} needs {v!r})"
           for k, v in wanted.items() if config[k] != v]
  if g1 and C.LOCAL in C.layer_types(config):
    wrong.append("local attention layers (HF GemmaForCausalLM has none)")
  if wrong:
    raise C.ConfigError("config cannot be written as a HF config: " + "; ".join(wrong))


def _rotate_half_config_to_hf(config) -> dict[str, Any]:
  arch, model_type = _HF_ARCH[config.family]
  hard = dict(norm_offset=0.0, scale_embeddings=False, activation="silu", qk_norm=False,
              post_attn_norm=False, post_ffw_norm=False, attn_logit_softcap=None,
              final_logit_softcap=None, query_pre_attn_scalar=float(config.head_dim),
              qkv_bias=config.family == "qwen2", rope_base_local=config.rope_base_global,
              rope_scale_local=config.rope_scale_global)
  wrong = [f"{k}={config[k]!r} (HF {arch} needs {v!r})" for k, v in hard.items() if config[k] != v]
  types = C.layer_types(config)
  first_local = types.index(C.LOCAL) if C.LOCAL in types else config.depth
  if config.family == "llama" and C.LOCAL in types:
    wrong.append("local attention layers (HF LlamaForCausalLM has none)")
  if any(t != (C.LOCAL if i >= first_local else C.GLOBAL) for i, t in enumerate(types)):
    wrong.append(f"attention_pattern {tuple(config.attention_pattern)} (HF {arch} slides on the "
                 "layers from max_window_layers on)")
  if config.rope_llama3 is not None and config.rope_scale_global != 1.0:
    wrong.append("both linear and llama3 RoPE scaling")
  if wrong:
    raise C.ConfigError("config cannot be written as a HF config: " + "; ".join(wrong))
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
    hf.update(use_sliding_window=C.LOCAL in types, max_window_layers=first_local,
              sliding_window=config.sliding_window or 4096)
  return hf


def config_to_hf(config) -> dict[str, Any]:
  """The HF `config.json` dict of a `*ForCausalLM` equivalent to `config`."""
  if config.family in _HF_ROTATE_HALF_TYPES.values():
    return _rotate_half_config_to_hf(config)
  arch, model_type = _HF_ARCH[config.family]
  types = C.layer_types(config)
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
            layer_types=["sliding_attention" if t == C.LOCAL else "full_attention" for t in types])
  if config.family == "gemma3":
    pattern = tuple(config.attention_pattern)
    if pattern == (C.LOCAL,) * (len(pattern) - 1) + (C.GLOBAL,):
      hf["sliding_window_pattern"] = len(pattern)
    hf.update(rope_local_base_freq=config.rope_base_local,
              rope_scaling=(None if config.rope_scale_global == 1.0 else
                            dict(rope_type="linear", factor=config.rope_scale_global)))
  return hf
