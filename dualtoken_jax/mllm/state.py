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
              (N(0, 0.02), as `bridges.gemma_orbax` does), else random;
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

from dualtoken_jax.parallel import sharding

from dualtoken_jax.bridges import dualtoken as weights
from dualtoken_jax.bridges import gemma_hf
from dualtoken_jax.bridges import gemma_orbax
from dualtoken_jax.bridges import layout as param_layout
from dualtoken_jax.bridges.tensor_files import check_tree
from dualtoken_jax.llm import sharding as llm_sharding
from dualtoken_jax.mllm import config as C
from dualtoken_jax.mllm import model as M
from dualtoken_jax.models.dualtoken import DualToken
from dualtoken_jax.training import checkpoints
from dualtoken_jax.training import state as T

@flax.struct.dataclass
class MLLMState(T.RngState):
  step: jax.Array
  params: Any
  opt_state: Any
  tokenizer: Any   # frozen {"params", "vq_stats"} of the DualToken tokenizer
  rng: jax.Array   # uint32 key data


class Modules(T.Modules):
  """The MLLM and the frozen tokenizer's Linen modules and the optimiser (no arrays)."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.model = M.DualTokenMLLM(M.frozen_model_config(config.model))
    self.tokenizer = M.tokenizer_module(config.model)

  def _boxed_params(self):
    return jax.eval_shape(lambda: self.model.init(
        jax.random.key(0), *M.dummy_inputs(self.config.model),
        method=M.DualTokenMLLM.initialize)["params"])

  def _boxed_tokenizer(self):
    size = self.config.model.tokenizer.image_size
    return jax.eval_shape(lambda: self.tokenizer.init(
        jax.random.key(0), jnp.zeros((1, size, size, 3)), method=DualToken.initialize))

  def abstract_state(self) -> tuple[MLLMState, dict]:
    """(abstract state, boxed {"params", "tokenizer"}) — shapes only."""
    boxed = {"params": self._boxed_params(), "tokenizer": self._boxed_tokenizer()}
    params = nn.meta.unbox(boxed["params"])
    abstract = MLLMState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
        opt_state=jax.eval_shape(self.tx(params).init, params),
        tokenizer=nn.meta.unbox(boxed["tokenizer"]), rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    return abstract, boxed

  def state_specs(self, abstract: MLLMState, boxed, mesh) -> MLLMState:
    """PartitionSpecs: logical rules for the decoder and projector, size fallback for the
    tokenizer's unnamed parts, Adam moments like their params, step and rng replicated."""
    param_specs = sharding.tree_specs(boxed["params"], mesh, self.rules)
    P = jax.sharding.PartitionSpec
    return MLLMState(step=P(), params=param_specs,
                     opt_state=T.mirror_specs(abstract.opt_state, abstract.params, param_specs),
                     tokenizer=sharding.tree_specs(boxed["tokenizer"], mesh, self.rules), rng=P())

  def create(self, mesh, shardings: MLLMState) -> MLLMState:
    """A fresh state, every part created or restored directly in its sharding."""
    config = self.config
    abstract, _ = self.abstract_state()
    init_key, state_key = jax.random.split(jax.random.key(config.seed))
    if config.init.mllm:
      loaded = restore_weights(checkpoints.read_run(config.init.mllm, "mllm")[0],
                               T.StateLayout(abstract, shardings))
      params, tokenizer = loaded["params"], loaded["tokenizer"]
    else:
      tokenizer = initial_tokenizer(config, abstract.tokenizer, shardings.tokenizer)
      llm = initial_llm(config, mesh, self.rules, shardings.params["llm"])
      fresh = {k: v for k, v in shardings.params.items() if k != "llm"}  # projector + heads
      params = jax.jit(lambda: {k: v for k, v in nn.meta.unbox(self.model.init(
          init_key, *M.dummy_inputs(config.model),
          method=M.DualTokenMLLM.initialize)["params"]).items() if k != "llm"},
                       out_shardings=fresh)()
      params["llm"] = llm
    opt_state = jax.jit(lambda p: self.tx(p).init(p), out_shardings=shardings.opt_state)(params)
    return MLLMState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
                     params=params, opt_state=opt_state, tokenizer=tokenizer,
                     rng=jax.device_put(jax.random.key_data(state_key), shardings.rng))


def restore_weights(step_dir: Path, layout: T.StateLayout) -> dict:
  """{"params", "tokenizer"} of an MLLM training checkpoint (no optimiser state), restored into
  `layout`'s shardings: a later stage's starting point, or what inference loads."""
  targets = layout.targets()
  return checkpoints.restore_subtrees(step_dir, {"params": targets.params,
                                                 "tokenizer": targets.tokenizer})


# ---------------------------------------------------------------- initial weights
def initial_tokenizer(config, abstract, shardings):
  """The frozen tokenizer's variables from `config.init.tokenizer`, else random."""
  if not config.init.tokenizer:
    logging.warning("config.init.tokenizer is empty: the tokenizer is RANDOM (demos/tests only)")
    return jax.jit(lambda: _random_tokenizer(config), out_shardings=shardings)()
  _, loaded = weights.load(config.init.tokenizer)
  expected = param_layout.shapes(abstract)
  found = param_layout.flatten(loaded)
  unused = sorted(set(found) - set(expected))
  if unused:  # e.g. the text tower, which config.model.tokenizer leaves out
    logging.info("tokenizer %s: not loading %d variables the MLLM does not use (%s, ...)",
                 config.init.tokenizer, len(unused), unused[0])
  check_tree(found, expected, f"tokenizer {config.init.tokenizer} vs config.model.tokenizer",
             ignore=set(unused).__contains__, labels=("checkpoint", "config"))
  variables = param_layout.unflatten({k: found[k] for k in expected})
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
    return gemma_orbax.load(config.init.llm_orbax, llm, mesh, rules, seed=config.seed)
  if config.init.llm_hf:
    return gemma_hf.load_params(config.init.llm_hf, llm, mesh, rules, seed=config.seed)
  return jax.device_put(llm_sharding.init_params(llm, config.seed, mesh, rules), shardings)
