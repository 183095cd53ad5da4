"""Hugging Face decoder checkpoints <-> the decoder's loop-layout params, both ways, exactly.

Reads `GemmaForCausalLM`, `Gemma2ForCausalLM`, `Gemma3ForCausalLM`, `Qwen2ForCausalLM` (Qwen2 and
Qwen2.5: q/k/v biases) and `LlamaForCausalLM` (Llama 2 / 3: an untied `lm_head.weight`)
safetensors (one file or a sharded `model.safetensors.index.json`), and the text decoder inside
`Gemma3ForConditionalGeneration` checkpoints (`language_model.model.` or
`model.language_model.` prefixes; their vision tower and projector keys are skipped knowingly).

One table of `bridges.rules.Rule`s serves both directions; several HF tensors may fill one of
ours (k_proj and v_proj -> `kv_einsum`, gate_proj and up_proj -> `gating_einsum`). Import is
strict: every missing, unexpected or misshaped key is listed in one `CheckpointError` (a tied
checkpoint may omit `lm_head.weight`, or hold a copy equal to the embedding; an untied one must
have it).
`load_params` streams a checkpoint into a decoder config's shardings, parameter by parameter (the
host never holds the model), and fits it to a larger vocabulary (the MLLM's appended special
tokens).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from dualtoken_jax.bridges import hf_config
from dualtoken_jax.bridges import gemma_orbax
from dualtoken_jax.bridges import layout
from dualtoken_jax.bridges import rules as R
from dualtoken_jax.bridges import tensor_files
from dualtoken_jax.bridges.tensor_files import CheckpointError, check_finite, read_tensors, write_safetensors
from dualtoken_jax.llm import config as C
from dualtoken_jax.llm import sharding as S

TEXT_PREFIXES = ("model.", "language_model.model.", "model.language_model.")
# Multimodal parts of Gemma3ForConditionalGeneration checkpoints: not the text decoder's.
_MULTIMODAL = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
               "model.multi_modal_projector.")
_LM_HEADS = ("lm_head.weight", "language_model.lm_head.weight")
OUTPUT_EMBEDDING = "embedder/output_embedding"  # untied decoders (HF lm_head.weight)


def _same(hf: str, ours: str, shape) -> R.Rule:
  return R.one(hf, ours, shape=shape)


def _heads_in(hf: str, ours: str, n: int, d: int, h: int) -> R.Rule:
  """Linear (n*h, d) <-> (n, d, h)."""
  return R.Rule((hf,), (ours,), lambda a: (a.reshape(n, h, d).transpose(0, 2, 1),),
                lambda w: (w.transpose(0, 2, 1).reshape(n * h, d),), ((n * h, d),))


def _fused_heads_in(hfs: tuple[str, ...], ours: str, n: int, d: int, h: int) -> R.Rule:
  """Several Linear (n*h, d) (k and v; or q, k and v) <-> one (len(hfs), n, d, h)."""
  return R.Rule(hfs, (ours,),
                lambda *a: (np.stack([x.reshape(n, h, d).transpose(0, 2, 1) for x in a]),),
                lambda w: tuple(x.transpose(0, 2, 1).reshape(n * h, d) for x in w),
                ((n * h, d),) * len(hfs))


def _fused_bias(hfs: tuple[str, ...], ours: str, n: int, h: int) -> R.Rule:
  """Biases (n*h,) of the projections fused in one einsum <-> `b` (len(hfs), n, h)."""
  return R.Rule(hfs, (ours,), lambda *a: (np.stack([x.reshape(n, h) for x in a]),),
                lambda b: tuple(x.reshape(n * h) for x in b), ((n * h,),) * len(hfs))


def _bias_rules(config, a: str, o: str) -> list[R.Rule]:
  """q/k/v bias rules (Qwen2), in the einsum grouping the attention uses."""
  n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
  if not config.qkv_bias:
    return []
  if C.uses_qkv_einsum(config):
    return [_fused_bias((f"{a}q_proj.bias", f"{a}k_proj.bias", f"{a}v_proj.bias"),
                        f"{o}attn/qkv_einsum/b", n, h)]
  return [R.one(f"{a}q_proj.bias", f"{o}attn/q_einsum/b", lambda x: x.reshape(n, h),
                lambda b: b.reshape(n * h), shape=(n * h,)),
          _fused_bias((f"{a}k_proj.bias", f"{a}v_proj.bias"), f"{o}attn/kv_einsum/b", k, h)]


# HF's name of the norm before the MLP: Gemma 2/3 reuse "post_attention_layernorm" for their
# post-attention norm; Gemma 1, Qwen2 and Llama call the pre-MLP norm that.
_SANDWICH_NORM_FAMILIES = ("gemma2", "gemma3")


def rules(config, prefix: str = "model.") -> list[R.Rule]:
  """The full table for a decoder config, HF keys under `prefix`."""
  d, f = config.width, config.mlp_dim
  n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
  table = [_same(f"{prefix}embed_tokens.weight", "embedder/input_embedding",
                 (config.vocab_size, d)),
           _same(f"{prefix}norm.weight", "final_norm/scale", (d,))]
  if not config.tie_embeddings:
    head = _LM_HEADS[1] if prefix == "language_model.model." else _LM_HEADS[0]
    table.append(_same(head, OUTPUT_EMBEDDING, (config.vocab_size, d)))
  for i in range(config.depth):
    t, o = f"{prefix}layers.{i}.", f"layer_{i}/"
    a = f"{t}self_attn."
    # Gemma 1 (and Qwen2, Llama) name the pre-FFN norm "post_attention_layernorm"; Gemma 2/3 use
    # that name for the post-attention norm and add pre/post_feedforward_layernorm.
    norms = {"input_layernorm": "pre_attention_norm"}
    if config.family not in _SANDWICH_NORM_FAMILIES:
      norms["post_attention_layernorm"] = "pre_ffw_norm"
    else:
      norms["pre_feedforward_layernorm"] = "pre_ffw_norm"
      if config.post_attn_norm:
        norms["post_attention_layernorm"] = "post_attention_norm"
      if config.post_ffw_norm:
        norms["post_feedforward_layernorm"] = "post_ffw_norm"
    table += [_same(f"{t}{hf}.weight", f"{o}{ours}/scale", (d,)) for hf, ours in norms.items()]
    if config.qk_norm:
      table += [_same(f"{a}q_norm.weight", f"{o}attn/_query_norm/scale", (h,)),
                _same(f"{a}k_norm.weight", f"{o}attn/_key_norm/scale", (h,))]
    if C.uses_qkv_einsum(config):
      table.append(_fused_heads_in((f"{a}q_proj.weight", f"{a}k_proj.weight", f"{a}v_proj.weight"),
                                   f"{o}attn/qkv_einsum/w", n, d, h))
    else:
      table += [_heads_in(f"{a}q_proj.weight", f"{o}attn/q_einsum/w", n, d, h),
                _fused_heads_in((f"{a}k_proj.weight", f"{a}v_proj.weight"), f"{o}attn/kv_einsum/w",
                                k, d, h)]
    table += _bias_rules(config, a, o)
    table += [
        # o_proj (D, N*H) <-> attn_vec_einsum (N, H, D)
        R.one(f"{a}o_proj.weight", f"{o}attn/attn_vec_einsum/w", lambda x: x.T.reshape(n, h, d),
              lambda w: w.reshape(n * h, d).T, shape=(d, n * h)),
        # gate_proj, up_proj (F, D) <-> gating_einsum (2, D, F): [0] is the GELU branch.
        R.Rule((f"{t}mlp.gate_proj.weight", f"{t}mlp.up_proj.weight"), (f"{o}mlp/gating_einsum",),
               lambda g, u: (np.stack([g.T, u.T]),), lambda w: (w[0].T, w[1].T), ((f, d), (f, d))),
        R.one(f"{t}mlp.down_proj.weight", f"{o}mlp/linear", lambda x: x.T, lambda w: w.T,
              shape=(d, f)),
    ]
  return table


def text_prefix(tensors: Mapping[str, object]) -> str:
  """The key prefix of the text decoder in a HF state dict ("model." for *ForCausalLM)."""
  for prefix in TEXT_PREFIXES:
    if f"{prefix}embed_tokens.weight" in tensors:
      return prefix
  return "model."


def _rule_table(tensors: Mapping[str, object], config) -> dict[str, Any]:
  """The arguments of `rules.import_tensors` / `rules.Pending` for a HF state dict."""
  prefix = text_prefix(tensors)
  multimodal = prefix != "model."
  other = []
  emb = tensors.get(f"{prefix}embed_tokens.weight")
  tied = config.tie_embeddings
  for head in _LM_HEADS if tied else ():  # tied: a saved lm_head must be the embedding table
    if head in tensors and emb is not None and not np.array_equal(tensors[head], emb):
      other.append(f"{head} differs from {prefix}embed_tokens.weight, but the config ties them "
                   "(tie_embeddings / HF tie_word_embeddings)")
  ignore = lambda k: (tied and k in _LM_HEADS) or (multimodal and k.startswith(_MULTIMODAL))
  return dict(tensors=tensors, rules=rules(config, prefix),
              expected=S.param_shapes(config, scan_layers=False), ignore=ignore, other=other)


def import_tensors(tensors: Mapping[str, np.ndarray], config, what: str = "HF checkpoint"
                   ) -> dict[str, np.ndarray]:
  """HF state dict -> our loop-layout flat params (dtypes as stored)."""
  flat = R.import_tensors(what=what, **_rule_table(tensors, config))
  return {k: np.asarray(v) for k, v in flat.items()}


def export_tensors(flat_loop: Mapping[str, np.ndarray], config) -> dict[str, np.ndarray]:
  """Our loop-layout flat params -> a `*ForCausalLM` state dict."""
  return {k: np.ascontiguousarray(v)
          for k, v in R.export_tensors(flat_loop, rules(config, "model.")).items()}


# ---------------------------------------------------------------- directories
def read_config(path: str | Path) -> dict:
  path = Path(path)
  file = path / "config.json" if path.is_dir() else path
  if not file.is_file():
    raise FileNotFoundError(f"no HF config.json at {file}")
  return json.loads(file.read_text())


def read_dir(path: str | Path) -> dict[str, np.ndarray]:
  """All tensors of a HF checkpoint directory (single or sharded safetensors)."""
  path = Path(path)
  index = path / "model.safetensors.index.json"
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    tensors = {}
    for name in files:
      tensors.update(read_tensors(path / name))
    return tensors
  single = path / "model.safetensors"
  if not single.is_file():
    raise FileNotFoundError(f"{path} has neither model.safetensors nor "
                            "model.safetensors.index.json")
  return read_tensors(single)


def open_dir(path: str | Path) -> dict[str, Any]:
  """Like `read_dir`, but each tensor is read only when a rule converts it (`load` holds one
  converted copy of the model in host memory; `load_params` one parameter)."""
  path = Path(path)
  index = path / "model.safetensors.index.json"
  if index.is_file():
    files = [path / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
  elif (path / "model.safetensors").is_file():
    files = [path / "model.safetensors"]
  else:
    return read_dir(path)  # the error naming what is missing
  tensors = {}
  for file in files:
    tensors.update(tensor_files.open_safetensors(file))
  return tensors


def load(path: str | Path, config=None) -> tuple[dict[str, np.ndarray], object]:
  """(loop-layout flat params, config) from a HF checkpoint directory (tensors read one rule at
  a time, `open_dir`)."""
  config = config or hf_config.config_from_hf(read_config(path))
  flat = import_tensors(open_dir(path), config, f"HF checkpoint {path}")
  check_finite(flat, f"HF checkpoint {path}")
  return flat, config


# Architecture fields a checkpoint must share with the decoder config it is loaded as (not
# vocab_size: appended special tokens extend the table; not dtype/scan/remat: execution choices).
ARCHITECTURE = ("family", "width", "depth", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                "attention_pattern", "sliding_window", "qk_norm", "post_attn_norm",
                "post_ffw_norm", "query_pre_attn_scalar", "attn_logit_softcap",
                "final_logit_softcap", "rope_base_local", "rope_base_global", "rope_scale_local",
                "rope_scale_global", "rope_llama3", "norm_offset", "scale_embeddings",
                "activation", "qkv_bias", "tie_embeddings")


def load_params(path: str | Path, config, mesh: Mesh | None = None,
                rules: Sequence[tuple[str, Any]] = S.DEFAULT_RULES, seed: int = 0):
  """A HF checkpoint directory as params of decoder `config`, in its layout, `param_dtype` and
  shardings on `mesh`, streamed: each parameter is read from the safetensors files, converted,
  placed into its sharding and dropped from host memory before the next is read, so the host
  holds one (stacked) parameter at a time, not the model. The config's vocabulary may be larger
  than the checkpoint's: the new embedding rows are drawn ~ N(0, 0.02) from `seed`. The
  architectures must agree; keys and shapes are checked before any tensor is read."""
  hf = hf_config.config_from_hf(read_config(path))
  different = [f"{k}: checkpoint {hf[k]!r}, config {config[k]!r}" for k in ARCHITECTURE
               if _normal(hf[k]) != _normal(config[k])]
  if hf.vocab_size > config.vocab_size:
    different.append(f"vocab_size: checkpoint {hf.vocab_size} > config {config.vocab_size}")
  what = f"HF checkpoint {path}"
  if different:
    raise CheckpointError(f"{what} vs the decoder config", other=different)
  pending = R.Pending(what=what, **_rule_table(open_dir(path), hf))
  new = config.vocab_size - hf.vocab_size

  def take(key: str) -> np.ndarray:
    value = pending.take(key)
    if new and key in (gemma_orbax.EMBEDDING, OUTPUT_EMBEDDING):  # the untied table grows too
      value = np.asarray(gemma_orbax.fit_vocab(value, value.shape[0], new, seed))
    return value

  params = place_one_by_one(take, config, mesh, rules)
  if new:
    logging.info("%s: appended %d embedding rows for new tokens", what, new)
  check_finite(params, what)
  return params


def place_one_by_one(take: Callable[[str], np.ndarray], config, mesh: Mesh | None = None,
                     rules: Sequence[tuple[str, Any]] = S.DEFAULT_RULES):
  """Loop-layout host arrays, produced one at a time by `take(path)` (e.g. `dict.pop`), ->
  device params in the config's layout, `param_dtype` and shardings, one parameter at a time:
  the host never holds more than one (stacked) parameter beyond what `take` keeps."""
  out = {}
  for path, target in layout.flatten(S.abstract_params(config, mesh, rules)).items():
    if layout.stack_of(path) is None:
      value = np.asarray(take(path)).astype(target.dtype, copy=False)
    else:  # the stack filled block by block: one stacked parameter plus one block on the host
      value = np.empty(target.shape, target.dtype)
      for i, p in enumerate(layout.block_paths(path, target.shape)):
        value[i] = take(p)
    out[path] = jax.device_put(value, target.sharding)
    del value
  return layout.unflatten(out)


def _normal(v):
  return tuple(v) if isinstance(v, (list, tuple)) else v


def save(path: str | Path, flat_loop: Mapping[str, np.ndarray], config,
         max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes config.json and model.safetensors (sharded with an index above `max_shard_bytes`)."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tensors = export_tensors(flat_loop, config)
  metadata = {"format": "pt"}  # transformers refuses safetensors files without it
  shards, size = [[]], 0
  for key, value in tensors.items():
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(key)
    size += value.nbytes
  if len(shards) == 1:
    write_safetensors(path / "model.safetensors", tensors, metadata)
  else:
    weight_map = {}
    for i, keys in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      write_safetensors(path / name, {k: tensors[k] for k in keys}, metadata)
      weight_map.update({k: name for k in keys})
    total = sum(v.nbytes for v in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  (path / "config.json").write_text(json.dumps(hf_config.config_to_hf(config), indent=2))
