"""Training-state machinery both trainers share (MaxText's `setup_initial_state`, in pieces).

A trainer's `Modules` subclass (`tokenizer_training/state.py`, `mllm/state.py`) knows its state
dataclass: `abstract_state()` (shapes, plus the logically boxed trees the specs come from),
`state_specs(...)` and `create(...)` (a fresh state initialised directly in its shardings).
Everything else is here, written once:

* `Modules`: the generator optimiser (AdamW on the warm-up-cosine schedule, freezing by regex);
* `StateLayout` / `state_layout`: abstract state -> PartitionSpecs -> NamedShardings;
* `setup_state`: restore the newest checkpoint into those shardings, or create a fresh state;
* `mirror_specs`: optimiser states sharded like their parameters;
* `activation_sharding`: the context in which models' activation constraints take effect;
* `keep_if_finite`: a step whose loss or gradient is not finite changes none of the given fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dualtoken_jax.parallel import sharding
from dualtoken_jax.training import optimizer as O


class RngState:
  """Mixin of the training-state dataclasses: `rng` holds raw uint32 key data (Orbax stores it
  like any array); `key()` is the typed key the step splits."""

  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)


class Modules:
  """The Linen modules and optax transforms a config implies (no arrays). Subclasses add their
  models and implement `abstract_state`, `state_specs` and `create`."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    o = config.optimizer
    self.schedule = O.warmup_cosine(o.lr, o.warmup_steps, config.total_steps)

  def masks(self, params):
    return O.trainable_masks(params, self.config.trainable, self.config.frozen)

  def tx(self, params) -> optax.GradientTransformation:
    o = self.config.optimizer
    base = O.adamw(self.schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                   params=params, grad_clip_norm=o.grad_clip_norm or None)
    return O.with_freezing(base, self.masks(params))

  @property
  def rules(self) -> list[tuple]:
    return [tuple(r) for r in self.config.sharding_rules]

  def abstract_state(self) -> tuple[Any, Any]:
    """(abstract state of ShapeDtypeStructs, the logically boxed trees `state_specs` reads)."""
    raise NotImplementedError

  def state_specs(self, abstract, boxed, mesh) -> Any:
    raise NotImplementedError

  def create(self, mesh, shardings) -> Any:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """A training state's shapes and where each of its leaves lives on the mesh."""
  abstract: Any   # the state dataclass of ShapeDtypeStructs
  shardings: Any  # the same tree of NamedShardings

  def targets(self) -> Any:
    """ShapeDtypeStructs carrying their shardings: what a checkpoint restores into."""
    return with_shardings(self.abstract, self.shardings)


def state_layout(modules: Modules, mesh) -> StateLayout:
  abstract, boxed = modules.abstract_state()
  return StateLayout(abstract, sharding.named(modules.state_specs(abstract, boxed, mesh), mesh))


def setup_state(modules: Modules, mesh, ckpt=None, data_iter=None) -> tuple[Any, StateLayout, int]:
  """(state, layout, start step): the newest complete checkpoint of `ckpt` restored into the
  mesh's shardings (with the data iterator's position), else a fresh state from `config.init`."""
  layout = state_layout(modules, mesh)
  start = ckpt.latest_step() if ckpt is not None else None
  if start is None:
    return modules.create(mesh, layout.shardings), layout, 0
  state, _ = ckpt.restore(start, layout.targets(), data_iter)
  return state, layout, start


def with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


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


def activation_sharding(rules: Sequence[tuple], mesh):
  """Context in which the models' activation constraints (`act_batch`, ...) take effect: the
  (abstract) mesh and the logical rules. A no-op without a mesh.

  Without it Flax's `with_logical_constraint` does nothing, and XLA may shard activations like
  the FSDP weights: every device then holds (and computes) the *global* batch's activations —
  at So400m-384 the ViT's attention maps alone are ~8x what a device should hold.
  """
  if mesh is None or mesh.empty:
    return contextlib.nullcontext()
  stack = contextlib.ExitStack()
  stack.enter_context(jax.sharding.use_abstract_mesh(getattr(mesh, "abstract_mesh", mesh)))
  stack.enter_context(nn.logical_axis_rules([tuple(r) for r in rules]))
  return stack


def keep_if_finite(finite: jax.Array, new, old, fields: Sequence[str]):
  """`new` with each of `fields` (weights, statistics, optimiser states) reverted to `old`'s
  unless `finite`: a NaN/Inf step changes nothing but the step counter and the RNG, so the run
  moves on to the next batch; the loop counts such steps and halts on too many in a row."""
  keep = lambda a, b: jnp.where(finite, a, b)
  return new.replace(**{f: jax.tree.map(keep, getattr(new, f), getattr(old, f)) for f in fields})


def tree_nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
