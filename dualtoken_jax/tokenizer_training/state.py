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
import optax

from dualtoken_jax.bridges import dualtoken as bridges
from dualtoken_jax.models.discriminator import PatchDiscriminator
from dualtoken_jax.models.dualtoken import DualToken
from dualtoken_jax.parallel import sharding
from dualtoken_jax.training import optimizer as O
from dualtoken_jax.training import state as T


@flax.struct.dataclass
class TrainState(T.RngState):
  step: jax.Array
  params: Any
  vq_stats: Any
  opt_state: Any
  teacher: Any          # frozen image-tower params (the initial SigLIP unless configured)
  disc_params: Any      # {} when the GAN is off
  disc_opt_state: Any
  rng: jax.Array        # uint32 key data


class Modules(T.Modules):
  """The tokenizer, its discriminator and both optimisers a config implies (no arrays)."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.model = DualToken(ml_collections.FrozenConfigDict(config.model))
    self.discriminator = PatchDiscriminator(ndf=config.gan.ndf) if config.gan.enabled else None
    g = config.gan
    self.disc_schedule = O.warmup_cosine(g.lr, g.warmup_steps,
                                         max(config.total_steps - g.start_step, 1),
                                         end_lr=g.end_lr, warmup_from_zero=True)
    size = config.model.image_size
    self.images_shape = (1, size, size, 3)  # what initialisation traces the models with

  def disc_tx(self) -> optax.GradientTransformation:
    g = self.config.gan
    return optax.adam(self.disc_schedule, b1=g.b1, b2=g.b2)

  def abstract_state(self) -> tuple[TrainState, dict]:
    """(abstract state, boxed variables) — shapes only, for sharding and checkpoint restore."""
    images = jax.ShapeDtypeStruct(self.images_shape, jnp.float32)
    boxed = jax.eval_shape(lambda x: self.model.init({"params": jax.random.key(0)}, x,
                                                     method=DualToken.initialize), images)
    unboxed = nn.meta.unbox(boxed)
    params, vq_stats = unboxed["params"], unboxed["vq_stats"]
    disc = (jax.eval_shape(self.discriminator.init, jax.random.key(0), images)["params"]
            if self.discriminator else {})
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params, vq_stats=vq_stats,
        opt_state=jax.eval_shape(self.tx(params).init, params),
        teacher=params["img"], disc_params=disc,
        disc_opt_state=jax.eval_shape(self.disc_tx().init, disc),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    return abstract, boxed

  def state_specs(self, abstract: TrainState, boxed, mesh) -> TrainState:
    """PartitionSpecs: logical rules for named params, size fallback for the rest; optimiser
    states mirror their params; step, rng replicated."""
    param_specs = sharding.tree_specs(boxed["params"], mesh, self.rules)
    stats_specs = sharding.tree_specs(boxed["vq_stats"], mesh, self.rules)
    disc_specs = sharding.tree_specs(abstract.disc_params, mesh, self.rules)
    P = jax.sharding.PartitionSpec
    return TrainState(
        step=P(), params=param_specs, vq_stats=stats_specs,
        opt_state=T.mirror_specs(abstract.opt_state, abstract.params, param_specs),
        teacher=param_specs["img"], disc_params=disc_specs,
        disc_opt_state=T.mirror_specs(abstract.disc_opt_state, abstract.disc_params, disc_specs),
        rng=P())

  def create(self, mesh, shardings: TrainState) -> TrainState:
    """A fresh state, initialised directly in its shardings (weights from `config.init`)."""
    del mesh  # the shardings carry it
    config = self.config
    init_key, disc_key, state_key = jax.random.split(jax.random.key(config.seed), 3)
    loaded = initial_weights(config)

    def init_fn(loaded_vars):
      images = jnp.zeros(self.images_shape, jnp.float32)
      if loaded_vars is None:
        variables = nn.meta.unbox(self.model.init({"params": init_key}, images,
                                                  method=DualToken.initialize))
      else:
        variables = loaded_vars
      params = variables["params"]
      disc = self.discriminator.init(disc_key, images)["params"] if self.discriminator else {}
      return TrainState(
          step=jnp.zeros((), jnp.int32), params=params, vq_stats=variables["vq_stats"],
          opt_state=self.tx(params).init(params), teacher=params["img"], disc_params=disc,
          disc_opt_state=self.disc_tx().init(disc), rng=jax.random.key_data(state_key))

    state = jax.jit(init_fn, out_shardings=shardings)(loaded)
    if config.teacher.siglip:
      teacher = bridges.init_with_siglip(config.model, config.teacher.siglip)["params"]["img"]
      state = state.replace(teacher=jax.device_put(teacher, shardings.teacher))
    return state


def initial_weights(config) -> dict | None:
  """Host variables {"params", "vq_stats"} from `config.init`: a tokenizer (saved, or a
  training run), a reference checkpoint, SigLIP towers (HF or big_vision) with the rest random;
  None for all random."""
  i = config.init
  if i.tokenizer:
    loaded_config, variables = bridges.load(i.tokenizer)
  elif i.reference:
    loaded_config, variables = bridges.load_reference(i.reference, i.reference_config or None)
  elif i.siglip:
    return bridges.init_with_siglip(config.model, i.siglip, seed=config.seed)
  else:
    logging.warning("config.init names no weights: SigLIP starts from random init (demo/debug only)")
    return None
  _check_same_model(loaded_config, config.model)
  return variables


def _check_same_model(loaded, wanted):
  a, b = loaded.to_dict(), wanted.to_dict()
  for key in ("image_size", "vision", "vq_pix", "vq_sem", "decoder", "layer_recon", "layer_sem"):
    if key in ("vq_pix", "vq_sem"):
      a[key] = {k: v for k, v in a[key].items() if k in ("codebook_size", "embed_dim", "depth")}
      b[key] = {k: v for k, v in b[key].items() if k in ("codebook_size", "embed_dim", "depth")}
    if a.get(key) != b.get(key):
      raise ValueError(f"config.init weights have {key}={a.get(key)} but config.model has {b.get(key)}")
