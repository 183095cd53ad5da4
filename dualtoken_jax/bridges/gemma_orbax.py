"""Official Gemma Flax/Orbax checkpoints <-> the decoder's params, restored into shardings.

Layouts read (gm's names, detected from the checkpoint's metadata):
  * FLAT (Kaggle / gs://gemma-data releases): top-level keys are flat strings
    `transformer/layer_{i}/attn/q_einsum`, ... mapping to leaf dicts `{w}`, `{scale}`,
    `{input_embedding}`; `mlp/gating_einsum` and `mlp/linear` are wrapped in `{w}`.
  * STACKED: `transformer/stacked_layers/attention_type_{k}/...`, leaves stacked over the layers
    with pattern index k: layer = slice * pattern_len + k.
  * NESTED: the Flax `init()` tree (`{'layer_0': {'attn': ...}}`), optionally under `params`
    or `transformer`; Kauldron checkpoints (`params/opt_state/step/collections`, possibly in a
    `default/` item) use their `params`.
Multimodal parts (`SigLiPFromPatches_0/...`, `vision_encoder`, `embedder/mm_*`) are skipped.

Fixes applied on load: gating stored (2, F, D) is transposed to our (2, D, F); trailing
padding rows of Gemma 1/2 tables are trimmed (`checkpoint_vocab_padding`); rows missing for
added tokens are appended (normal, sigma 0.02); dtypes are cast to `param_dtype`.

Memory: the restore target is an abstract tree *in the checkpoint's layout* whose leaves carry
`NamedSharding`s derived from the model's logical axes, so each host reads only its shards;
a jitted relayout (stack, transpose, trim, cast) with the model's output shardings follows.
Peak device memory is about twice the model's shard.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding

from dualtoken_jax.bridges import layout
from dualtoken_jax.bridges.tensor_files import CheckpointError, check_finite, check_tree
from dualtoken_jax.llm import sharding as S

FLAT, STACKED, NESTED = "flat", "stacked", "nested"
LAYOUTS = (FLAT, STACKED, NESTED)
EMBEDDING = "embedder/input_embedding"
NEW_ROW_STDDEV = 0.02
_STACKED_KEY = re.compile(r"^transformer/stacked_layers/attention_type_(\d+)(/.*)$")
_MLP_LEAF = re.compile(r"/mlp/(gating_einsum|linear)$")


def _is_multimodal(canonical: str) -> bool:
  return canonical.startswith(("vision_encoder/", "embedder/mm_", "SigLiPFromPatches_0/"))


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one loop-layout parameter lives in the checkpoint tree."""
  key: tuple[str, ...]      # key path of the checkpoint leaf
  index: int | None         # slice on axis 0 of a STACKED leaf
  shape: tuple[int, ...]    # the parameter's own shape (without the stacked axis)
  stored: tuple[int, ...]   # the checkpoint leaf's shape


# ---------------------------------------------------------------- reading the layout
def read_metadata(path: str | Path) -> tuple[Path, dict]:
  """(directory holding the item, metadata tree of ArrayMetadata)."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no Orbax checkpoint at {path}")
  if not (path / "_METADATA").exists() and (path / "default").is_dir():
    path = path / "default"  # Kauldron: the item is in default/
  meta = ocp.StandardCheckpointer().metadata(path).item_metadata
  if meta is None:
    raise CheckpointError(f"Orbax checkpoint {path}", other=["no item metadata (_METADATA) found"])
  tree = meta.tree if hasattr(meta, "tree") else meta
  return path, dict(tree)


def detect_layout(tree: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
  """(layout, key path of the parameter tree root inside the checkpoint)."""
  keys = set(tree)
  if any(_STACKED_KEY.match(k) for k in keys):
    return STACKED, ()
  if keys and all(k.startswith(("transformer/", "SigLiPFromPatches_0/")) for k in keys):
    return FLAT, ()
  if keys == {"collections", "opt_state", "params", "step"}:  # Kauldron train state
    return NESTED, ("params",)
  for wrapper in ("params", "transformer"):
    if keys == {wrapper}:
      return NESTED, (wrapper,)
  return NESTED, ()


def _canonical(prefix: str, leaf: str) -> str:
  """Our loop-layout path of checkpoint leaf `leaf` of the per-layer key `prefix`."""
  if _MLP_LEAF.search(prefix) and leaf == "w":
    return prefix
  return f"{prefix}/{leaf}"


def sources(tree: Mapping[str, Any], kind: str, root: tuple[str, ...]) -> dict[str, Source]:
  """Loop-layout path -> Source for every parameter in the checkpoint (multimodal included)."""
  out: dict[str, Source] = {}
  if kind == NESTED:
    sub = tree
    for k in root:
      sub = sub[k]
    for path, meta in layout.flatten(sub).items():
      canonical = path[:-2] if _MLP_LEAF.search(path[:-2]) and path.endswith("/w") else path
      shape = tuple(meta.shape)
      out[canonical] = Source(root + tuple(path.split("/")), None, shape, shape)
    return out
  pattern_len = 1 + max((int(m.group(1)) for m in map(_STACKED_KEY.match, tree) if m), default=0)
  for key, leaves in tree.items():
    if not isinstance(leaves, Mapping):
      shape = tuple(leaves.shape)
      out[key] = Source((key,), None, shape, shape)  # not gm: reported as unexpected
      continue
    name = key[len("transformer/"):] if key.startswith("transformer/") else key
    m = _STACKED_KEY.match(key)
    for leaf, meta in leaves.items():
      stored = tuple(meta.shape)
      if m is None:
        out[_canonical(name, leaf)] = Source((key, leaf), None, stored, stored)
        continue
      k, suffix = int(m.group(1)), m.group(2)
      for s in range(stored[0]):
        canonical = _canonical(f"layer_{s * pattern_len + k}{suffix}", leaf)
        out[canonical] = Source((key, leaf), s, stored[1:], stored)
  return out


# ---------------------------------------------------------------- checking against the config
def _gating_transposed(shape, expected, config) -> bool:
  _, d, f = expected
  if tuple(shape) != (2, f, d):
    return False
  return d != f or config.transpose_gating_einsum  # square: trust the config's hint


def vocab_plan(rows: int, config) -> tuple[int, int]:
  """(rows kept from the checkpoint table, rows to append) for a table of `rows` rows."""
  v, pad = config.vocab_size, config.checkpoint_vocab_padding
  if rows == v:
    return rows, 0
  if pad and rows > v and rows - pad <= v:  # released padding rows, maybe plus new tokens
    return rows - pad, v - (rows - pad)
  if rows < v:
    return rows, v - rows
  raise ValueError(f"{rows} rows cannot become vocab_size {v} "
                   f"(checkpoint_vocab_padding {pad})")


def plan(found: Mapping[str, Source], config, what: str) -> dict[str, Source]:
  """Checks the checkpoint against the config; returns the sources the model needs.

  Raises CheckpointError listing every missing, unexpected and misshaped parameter.
  """
  expected = S.param_shapes(config, scan_layers=False)
  shapes, other = {}, []
  for path, src in found.items():
    shape = expected.get(path)
    fits = src.shape == shape
    if path.endswith("/mlp/gating_einsum") and shape is not None:
      fits = fits or _gating_transposed(src.shape, shape, config)
    if path == EMBEDDING and shape is not None and len(src.shape) == 2 and src.shape[1] == shape[1]:
      try:
        vocab_plan(src.shape[0], config)
        fits = True
      except ValueError as e:
        other.append(f"{path}: {e}")
    shapes[path] = shape if fits else src.shape
  check_tree(shapes, expected, what, ignore=_is_multimodal, other=other)
  return {p: found[p] for p in expected}


# ---------------------------------------------------------------- restore into shardings
def load(path: str | Path, config, mesh: Mesh | None = None,
         rules: Sequence[tuple[str, Any]] = S.DEFAULT_RULES, seed: int = 0):
  """Restores an official Gemma checkpoint as params in the config's layout, each leaf in its
  `NamedSharding` on `mesh` (default: the first device)."""
  mesh = mesh or S.single_device_mesh()
  item_dir, tree = read_metadata(path)
  kind, root = detect_layout(tree)
  needed = plan(sources(tree, kind, root), config, f"Orbax checkpoint {path} ({kind} layout)")
  dtype = np.dtype(config.param_dtype)
  names = S.param_names(config, scan_layers=False)
  expected = S.param_shapes(config, scan_layers=False)
  transposed = {p for p, src in needed.items() if p.endswith("/mlp/gating_einsum")
                and _gating_transposed(src.shape, expected[p], config)}

  # 1. Abstract target in the checkpoint's own layout, leaves sharded like their parameter.
  abstract: dict[tuple[str, ...], jax.ShapeDtypeStruct] = {}
  for param, src in needed.items():
    if src.key in abstract:
      continue
    leaf_names = names[param]
    if param in transposed:
      leaf_names = (leaf_names[0], leaf_names[2], leaf_names[1])
    if src.index is not None:
      leaf_names = (None,) + leaf_names
    spec = S.spec_for(leaf_names, src.stored, mesh, rules)
    abstract[src.key] = jax.ShapeDtypeStruct(src.stored, dtype, sharding=NamedSharding(mesh, spec))
  item = _nest(abstract)
  restored = ocp.PyTreeCheckpointer().restore(item_dir, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True))

  # 2. Relayout on device, straight into the model's shardings.
  vocab = vocab_plan(needed[EMBEDDING].shape[0], config)
  if vocab != (config.vocab_size, 0):
    logging.info("Gemma checkpoint %s: embedding keeps %d rows, appends %d new rows",
                 path, *vocab)
  target = S.shardings_of(S.abstract_params(config, mesh, rules))

  def relayout(restored):
    flat_loop = {}
    for p, src in needed.items():
      a = _get(restored, src.key)
      if src.index is not None:
        a = a[src.index]
      if p in transposed:
        a = jnp.swapaxes(a, 1, 2)
      if p == EMBEDDING:
        a = fit_vocab(a, *vocab, seed)
      flat_loop[p] = a.astype(dtype)
    flat = layout.to_scan(flat_loop, config.depth, jnp.stack) if config.scan_layers else flat_loop
    return layout.unflatten(flat)

  params = jax.jit(relayout, out_shardings=target)(restored)
  check_finite(params, f"Orbax checkpoint {item_dir}")
  return params


def fit_vocab(table, keep: int, new: int, seed: int):
  """The first `keep` rows of an embedding table, then `new` rows ~ N(0, NEW_ROW_STDDEV²)."""
  table = table[:keep]
  if new:
    rows = NEW_ROW_STDDEV * jax.random.normal(jax.random.key(seed), (new, table.shape[1]))
    table = jnp.concatenate([table, rows.astype(table.dtype)])
  return table


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for key, value in flat.items():
    node = out
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = value
  return out


def _get(tree, key: tuple[str, ...]):
  for k in key:
    tree = tree[k]
  return tree


# ---------------------------------------------------------------- export
def to_checkpoint_tree(params: Mapping[str, Any], config, kind: str = FLAT) -> dict:
  """Our params (either layout) -> a gm tree in `kind` layout. Gating is written (2, F, D)
  when `config.transpose_gating_einsum` (as gm expects for Gemma 2 9B/27B and Gemma 3)."""
  if kind not in LAYOUTS:
    raise ValueError(f"layout {kind!r} is not one of {LAYOUTS}")
  flat = layout.flatten(params)
  if layout.is_scanned(flat):
    flat = layout.to_loop(flat)
  if config.transpose_gating_einsum:
    flat = {k: (jnp.swapaxes(v, 1, 2) if k.endswith("/mlp/gating_einsum") else v)
            for k, v in flat.items()}
  if kind == NESTED:
    return layout.unflatten(flat)
  out: dict[str, dict[str, Any]] = {}
  pattern_len = len(tuple(config.attention_pattern))
  stacked: dict[tuple[str, str], dict[int, Any]] = {}
  for path, value in flat.items():
    key, leaf = (path, "w") if _MLP_LEAF.search(path) else tuple(path.rsplit("/", 1))
    m = re.match(r"^layer_(\d+)(/.*)$", key)
    if kind == STACKED and m:
      i = int(m.group(1))
      group = f"transformer/stacked_layers/attention_type_{i % pattern_len}{m.group(2)}"
      stacked.setdefault((group, leaf), {})[i // pattern_len] = value
    else:
      out.setdefault(f"transformer/{key}", {})[leaf] = value
  for (group, leaf), slices in stacked.items():
    out.setdefault(group, {})[leaf] = jnp.stack([slices[s] for s in range(len(slices))])
  return out


def save(path: str | Path, params: Mapping[str, Any], config, kind: str = FLAT) -> None:
  """Writes `params` as an official-style Gemma Orbax checkpoint (FLAT by default). The
  relayout runs on device (one jitted program), so sharded params are never gathered."""
  tree = jax.jit(lambda p: to_checkpoint_tree(p, config, kind))(params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(Path(path).absolute(), tree)
  checkpointer.wait_until_finished()
