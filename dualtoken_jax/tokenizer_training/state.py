"""The tokenizer's training state: what a step reads and writes, and what a checkpoint holds.

`TrainState` keeps params (trained by the optimiser), `vq_stats` (EMA codebooks: changed only by
the quantisers), the frozen teacher tower, the discriminator and both optimiser states, the
step and the RNG key (as raw key data, so Orbax stores it like any array).
"""

from __future__ import annotations

import logging
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dualtoken_jax.parallel import sharding
from dualtoken_jax.bridges import flat as F
from dualtoken_jax.models.discriminator import PatchDiscriminator
from dualtoken_jax.models.dualtoken import DualToken
from dualtoken_jax.tokenizer import DualTokenizer
from dualtoken_jax.training import optimizer as O


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  vq_stats: Any
  opt_state: Any
  teacher: Any          # frozen image-tower params (the initial SigLIP unless configured)
  disc_params: Any      # {} when the GAN is off
  disc_opt_state: Any
  rng: jax.Array        # uint32 key data

  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)


class Modules:
  """The Linen modules and optax transforms a config implies (no arrays)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model = DualToken(ml_collections.FrozenConfigDict(config.model))
    self.discriminator = PatchDiscriminator(ndf=config.gan.ndf) if config.gan.enabled else None
    o = config.optimizer
    self.schedule = O.warmup_cosine(o.lr, o.warmup_steps, config.total_steps)
    g = config.gan
    self.disc_schedule = O.warmup_cosine(g.lr, g.warmup_steps,
                                         max(config.total_steps - g.start_step, 1),
                                         end_lr=g.end_lr, warmup_from_zero=True)

  def tx(self, params) -> optax.GradientTransformation:
    o = self.config.optimizer
    base = O.adamw(self.schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                   params=params, grad_clip_norm=o.grad_clip_norm or None)
    return O.with_freezing(base, self.masks(params))

  def masks(self, params):
    return O.trainable_masks(params, self.config.trainable, self.config.frozen)

  def disc_tx(self) -> optax.GradientTransformation:
    g = self.config.gan
    return optax.adam(self.disc_schedule, b1=g.b1, b2=g.b2)


def initial_weights(config, seed: int) -> dict:
  """{"params", "vq_stats"} from `config.init`: a tokenizer checkpoint, a reference checkpoint,
  SigLIP towers (HF or big_vision) with the rest random, or all random."""
  i = config.init
  if i.tokenizer:
    tok = DualTokenizer.from_pretrained(i.tokenizer)
  elif i.reference:
    tok = DualTokenizer.from_reference(i.reference, i.reference_config or None)
  elif i.siglip:
    tok = DualTokenizer.from_siglip(config.model, i.siglip, seed=seed)
  else:
    logging.warning("config.init names no weights: SigLIP starts from random init (demo/debug only)")
    return None
  _check_same_model(tok.config, config.model)
  return F.to_host(tok.variables)


def _check_same_model(loaded, wanted):
  a, b = loaded.to_dict(), wanted.to_dict()
  for key in ("image_size", "vision", "vq_pix", "vq_sem", "decoder", "layer_recon", "layer_sem"):
    if key in ("vq_pix", "vq_sem"):
      a[key] = {k: v for k, v in a[key].items() if k in ("codebook_size", "embed_dim", "depth")}
      b[key] = {k: v for k, v in b[key].items() if k in ("codebook_size", "embed_dim", "depth")}
    if a.get(key) != b.get(key):
      raise ValueError(f"config.init weights have {key}={a.get(key)} but config.model has {b.get(key)}")


def abstract_state(modules: Modules, images_shape) -> tuple[TrainState, TrainState]:
  """(abstract state, partition specs) — shapes only, for sharding and checkpoint restore."""
  config = modules.config
  def boxed_init():
    images = jnp.zeros(images_shape, jnp.float32)
    return modules.model.init({"params": jax.random.key(0)}, images, method=DualToken.initialize)
  boxed = jax.eval_shape(boxed_init)
  unboxed = nn.meta.unbox(boxed)
  params, vq_stats = unboxed["params"], unboxed["vq_stats"]
  disc = (jax.eval_shape(modules.discriminator.init, jax.random.key(0),
                         jnp.zeros(images_shape, jnp.float32))["params"]
          if modules.discriminator else {})
  abstract = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=params, vq_stats=vq_stats,
      opt_state=jax.eval_shape(modules.tx(params).init, params),
      teacher=params["img"], disc_params=disc,
      disc_opt_state=jax.eval_shape(modules.disc_tx().init, disc),
      rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  return abstract, boxed


def state_specs(modules: Modules, abstract: TrainState, boxed, mesh) -> TrainState:
  """PartitionSpecs: logical rules for named params, size fallback for the rest; optimiser
  states mirror their params; step, rng replicated."""
  rules = [tuple(r) for r in modules.config.sharding_rules]
  param_specs = sharding.tree_specs(boxed["params"], mesh, rules)
  stats_specs = sharding.tree_specs(boxed["vq_stats"], mesh, rules)
  disc_specs = sharding.tree_specs(abstract.disc_params, mesh, rules)
  P = jax.sharding.PartitionSpec
  return TrainState(
      step=P(), params=param_specs, vq_stats=stats_specs,
      opt_state=mirror_specs(abstract.opt_state, abstract.params, param_specs),
      teacher=param_specs["img"], disc_params=disc_specs,
      disc_opt_state=mirror_specs(abstract.disc_opt_state, abstract.disc_params, disc_specs), rng=P())


def mirror_specs(opt_state, params, param_specs):
  """Specs for an optimiser state: a leaf whose key path ends with a parameter's path (and has
  its shape) — Adam's mu and nu — takes that parameter's spec; everything else is replicated."""
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  by_path = {}
  for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree.leaves(param_specs, is_leaf=is_spec)):
    by_path[_dict_keys(path)] = (tuple(leaf.shape), spec)
  longest = max((len(k) for k in by_path), default=0)
  def spec_of(path, leaf):
    keys = _dict_keys(path)
    for n in range(min(longest, len(keys)), 0, -1):
      hit = by_path.get(keys[-n:])
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return jax.sharding.PartitionSpec()
  return jax.tree_util.tree_map_with_path(spec_of, opt_state)


def _dict_keys(path) -> tuple[str, ...]:
  """The trailing run of dict keys of a key path (the parameter path inside an optax state)."""
  keys = []
  for entry in reversed(path):
    if not isinstance(entry, jax.tree_util.DictKey):
      break
    keys.append(str(entry.key))
  return tuple(reversed(keys))


def create(modules: Modules, images_shape, mesh, shardings: TrainState) -> TrainState:
  """A fresh state, initialised directly in its shardings (weights from `config.init`)."""
  config = modules.config
  key = jax.random.key(config.seed)
  init_key, disc_key, state_key = jax.random.split(key, 3)
  loaded = initial_weights(config, config.seed)

  def init_fn(loaded_vars):
    images = jnp.zeros(images_shape, jnp.float32)
    if loaded_vars is None:
      variables = nn.meta.unbox(modules.model.init({"params": init_key}, images,
                                                   method=DualToken.initialize))
    else:
      variables = loaded_vars
    params = variables["params"]
    disc = (modules.discriminator.init(disc_key, images)["params"] if modules.discriminator else {})
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, vq_stats=variables["vq_stats"],
        opt_state=modules.tx(params).init(params), teacher=params["img"], disc_params=disc,
        disc_opt_state=modules.disc_tx().init(disc),
        rng=jax.random.key_data(state_key))

  state = jax.jit(init_fn, out_shardings=shardings)(loaded)
  if config.teacher.siglip:
    state = state.replace(teacher=_teacher_from(config, shardings.teacher))
  return state


def _teacher_from(config, teacher_shardings):
  tok = DualTokenizer.from_siglip(config.model, config.teacher.siglip)
  return jax.device_put(F.to_host(tok.variables)["params"]["img"], teacher_shardings)


def tree_nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
