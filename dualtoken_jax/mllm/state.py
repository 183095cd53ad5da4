"""The MLLM's training state, its shardings, and where its weights come from.

`MLLMState` holds the trained `params` ({"llm", "projector", "gen_pixel", "gen_semantic"},
see `model.py`), their optimiser
state (only trainable leaves have Adam moments), the frozen tokenizer's variables
({"params", "vq_stats"}: never differentiated, never updated), the step and the RNG key data.

Initial weights (`config.init`), each restored straight into its target sharding:
  tokenizer   a `DualTokenizer.save` directory or a `dualtoken_jax.train` run, else random
              (demos and tests only);
  llm         a HF Gemma checkpoint (`llm_hf`) or an official Orbax one (`llm_orbax`) as the
              `llm` subtree, embedding rows of appended special tokens initialised
              (N(0, 0.02), as `llm.orbax_bridge` does), else random;
  mllm        a previous stage's workdir: its newest checkpoint's `params` and `tokenizer`
              (e.g. SFT starting from alignment), overriding the two above;
  projector, heads   random unless they come from `mllm`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dualtoken_jax.parallel import sharding

from dualtoken_jax.tokenizer import DualTokenizer
from dualtoken_jax.bridges.tensor_files import CheckpointError
from dualtoken_jax.llm import config as llm_config
from dualtoken_jax.llm import hf_bridge
from dualtoken_jax.llm import layout as llm_layout
from dualtoken_jax.llm import orbax_bridge
from dualtoken_jax.llm import sharding as llm_sharding
from dualtoken_jax.mllm import config as C
from dualtoken_jax.mllm import model as M
from dualtoken_jax.models.dualtoken import DualToken
from dualtoken_jax.training import checkpoints
from dualtoken_jax.training import optimizer as O
from dualtoken_jax.tokenizer_training.state import mirror_specs

# Architecture fields a loaded LLM checkpoint must share with the config (not vocab_size:
# appended special tokens extend the table; not dtype/scan/remat: execution choices).
_ARCHITECTURE = ("family", "width", "depth", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                 "attention_pattern", "sliding_window", "qk_norm", "post_attn_norm",
                 "post_ffw_norm", "query_pre_attn_scalar", "attn_logit_softcap",
                 "final_logit_softcap", "rope_base_local", "rope_base_global")


@flax.struct.dataclass
class MLLMState:
  step: jax.Array
  params: Any
  opt_state: Any
  tokenizer: Any   # frozen {"params", "vq_stats"} of the DualToken tokenizer
  rng: jax.Array   # uint32 key data

  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)


class Modules:
  """The Linen modules and optax transforms a config implies (no arrays)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model = M.DualTokenMLLM(M.frozen_model_config(config.model))
    self.tokenizer = M.tokenizer_module(config.model)
    o = config.optimizer
    self.schedule = O.warmup_cosine(o.lr, o.warmup_steps, config.total_steps)

  def masks(self, params):
    return O.trainable_masks(params, self.config.trainable, self.config.frozen)

  def tx(self, params) -> optax.GradientTransformation:
    o = self.config.optimizer
    base = O.adamw(self.schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                   params=params, grad_clip_norm=o.grad_clip_norm or None)
    return O.with_freezing(base, self.masks(params))


# ---------------------------------------------------------------- shapes and shardings
def _boxed_params(modules: Modules):
  return jax.eval_shape(lambda: modules.model.init(
      jax.random.key(0), *M.dummy_inputs(modules.config.model),
      method=M.DualTokenMLLM.initialize)["params"])


def _boxed_tokenizer(modules: Modules):
  size = modules.config.model.tokenizer.image_size
  return jax.eval_shape(lambda: modules.tokenizer.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), method=DualToken.initialize))


def abstract_state(modules: Modules) -> tuple[MLLMState, dict]:
  """(abstract state, boxed {"params", "tokenizer"}) — shapes only."""
  boxed = {"params": _boxed_params(modules), "tokenizer": _boxed_tokenizer(modules)}
  params = nn.meta.unbox(boxed["params"])
  abstract = MLLMState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
      opt_state=jax.eval_shape(modules.tx(params).init, params),
      tokenizer=nn.meta.unbox(boxed["tokenizer"]), rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  return abstract, boxed


def state_specs(modules: Modules, abstract: MLLMState, boxed, mesh) -> MLLMState:
  """PartitionSpecs: logical rules for the decoder and projector, size fallback for the
  tokenizer's unnamed parts, Adam moments like their params, step and rng replicated."""
  rules = [tuple(r) for r in modules.config.sharding_rules]
  param_specs = sharding.tree_specs(boxed["params"], mesh, rules)
  P = jax.sharding.PartitionSpec
  return MLLMState(step=P(), params=param_specs,
                   opt_state=mirror_specs(abstract.opt_state, abstract.params, param_specs),
                   tokenizer=sharding.tree_specs(boxed["tokenizer"], mesh, rules), rng=P())


def with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


# ---------------------------------------------------------------- initial weights
def create(modules: Modules, mesh, shardings: MLLMState) -> MLLMState:
  """A fresh state, every part created or restored directly in its sharding."""
  config = modules.config
  abstract, _ = abstract_state(modules)
  init_key, state_key = jax.random.split(jax.random.key(config.seed))
  rules = [tuple(r) for r in config.sharding_rules]
  if config.init.mllm:
    loaded = restore_subtrees(latest_step_dir(config.init.mllm),
                              {"params": with_shardings(abstract.params, shardings.params),
                               "tokenizer": with_shardings(abstract.tokenizer,
                                                           shardings.tokenizer)})
    params, tokenizer = loaded["params"], loaded["tokenizer"]
  else:
    tokenizer = initial_tokenizer(config, abstract.tokenizer, shardings.tokenizer)
    llm = initial_llm(config, mesh, rules, shardings.params["llm"])
    fresh = {k: v for k, v in shardings.params.items() if k != "llm"}  # projector + heads
    params = jax.jit(lambda: {k: v for k, v in nn.meta.unbox(modules.model.init(
        init_key, *M.dummy_inputs(config.model),
        method=M.DualTokenMLLM.initialize)["params"]).items() if k != "llm"},
                     out_shardings=fresh)()
    params["llm"] = llm
  opt_state = jax.jit(lambda p: modules.tx(p).init(p), out_shardings=shardings.opt_state)(params)
  return MLLMState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params,
                   opt_state=opt_state, tokenizer=tokenizer,
                   rng=jax.device_put(jax.random.key_data(state_key), shardings.rng))


def initial_tokenizer(config, abstract, shardings):
  """The frozen tokenizer's variables from `config.init.tokenizer`, else random."""
  if not config.init.tokenizer:
    logging.warning("config.init.tokenizer is empty: the tokenizer is RANDOM (demos/tests only)")
    return jax.jit(lambda: _random_tokenizer(config), out_shardings=shardings)()
  tok = DualTokenizer.load(config.init.tokenizer)
  expected = {k: v.shape for k, v in llm_layout.flatten(abstract).items()}
  found = llm_layout.flatten(tok.variables)
  unused = sorted(set(found) - set(expected))
  if unused:  # e.g. the text tower, which config.model.tokenizer leaves out
    logging.info("tokenizer %s: not loading %d variables the MLLM does not use (%s, ...)",
                 config.init.tokenizer, len(unused), unused[0])
  err = CheckpointError(
      f"tokenizer {config.init.tokenizer} vs config.model.tokenizer",
      missing=sorted(set(expected) - set(found)),
      misshaped=[f"{k}: checkpoint {tuple(found[k].shape)}, config {expected[k]}"
                 for k in expected if k in found and tuple(found[k].shape) != expected[k]])
  if err.has_problems:
    raise err
  variables = llm_layout.unflatten({k: found[k] for k in expected})
  return jax.device_put(variables, shardings)


def _random_tokenizer(config):
  size = config.model.tokenizer.image_size
  module = M.tokenizer_module(config.model)
  return nn.meta.unbox(module.init(jax.random.key(config.init.tokenizer_seed),
                                   jnp.zeros((1, size, size, 3)), method=DualToken.initialize))


def initial_llm(config, mesh, rules, shardings):
  """The `llm` subtree: from a HF or Orbax Gemma checkpoint, else random."""
  llm = config.model.llm
  if config.init.llm_orbax:
    return orbax_bridge.load(config.init.llm_orbax, llm, mesh, rules, seed=config.seed)
  if config.init.llm_hf:
    return load_hf_llm(config.init.llm_hf, llm, mesh, rules, seed=config.seed)
  return jax.device_put(llm_sharding.init_params(llm, config.seed, mesh, rules), shardings)


def load_hf_llm(path, llm, mesh, rules, seed: int = 0):
  """A HF Gemma checkpoint as params of decoder config `llm`, whose vocabulary may be larger
  (appended rows ~ N(0, 0.02)); the architectures must agree."""
  hf = llm_config.config_from_hf(hf_bridge.read_config(path))
  different = [f"{k}: checkpoint {hf[k]!r}, config {llm[k]!r}" for k in _ARCHITECTURE
               if _normal(hf[k]) != _normal(llm[k])]
  if different or hf.vocab_size > llm.vocab_size:
    if hf.vocab_size > llm.vocab_size:
      different.append(f"vocab_size: checkpoint {hf.vocab_size} > config {llm.vocab_size}")
    raise CheckpointError(f"HF checkpoint {path} vs config.model.llm", other=different)
  flat, _ = hf_bridge.load(path, hf)
  table = flat[orbax_bridge.EMBEDDING]
  new = llm.vocab_size - table.shape[0]
  if new:
    rows = orbax_bridge.NEW_ROW_STDDEV * np.asarray(
        jax.random.normal(jax.random.key(seed), (new, table.shape[1])))
    flat[orbax_bridge.EMBEDDING] = np.concatenate([table, rows.astype(table.dtype)])
    logging.info("HF checkpoint %s: appended %d embedding rows for new tokens", path, new)
  if llm.scan_layers:
    flat = llm_layout.to_scan(flat, llm.depth)
  return llm_sharding.place(llm_layout.unflatten(flat), llm, mesh, rules)


def _normal(v):
  return tuple(v) if isinstance(v, (list, tuple)) else v


# Checkpoints of a run: shared with the tokenizer trainer.
latest_step_dir = checkpoints.latest_step_dir
restore_subtrees = checkpoints.restore_subtrees
read_meta = checkpoints.read_meta
