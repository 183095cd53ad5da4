"""PaliGemma / big_vision Gemma `.npz` checkpoints -> the decoder's params, strictly.

big_vision saves its params flat in an `.npz` with `/`-joined keys; the language model sits
under `params/llm/` (or `llm/` in a bare params file) as a *stacked* tree,
`llm/layers/attn/q_einsum/w` (L, N, D, H), `llm/layers/mlp/gating_einsum` (L, 2, D, F), ...,
`llm/embedder/input_embedding`, `llm/final_norm/scale`: exactly this project's scan layout with
the gm leaf names. The image tower (`img/...`) and anything outside the LLM are skipped
knowingly; inside it every missing, unexpected or misshaped key is listed in one
`CheckpointError`. PaliGemma's vocabulary (257,152 rows: Gemma's 256,000 plus location and
segmentation tokens) must be the config's `vocab_size`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from jax.sharding import Mesh

from dualtoken_jax.bridges import layout
from dualtoken_jax.bridges.tensor_files import CheckpointError, check_tree, read_npz
from dualtoken_jax.llm import sharding as S

LLM_PREFIXES = ("params/llm/", "llm/")


def llm_prefix(arrays: Mapping[str, Any]) -> str:
  """The key prefix of the LLM in a big_vision params file."""
  for prefix in LLM_PREFIXES:
    if any(k.startswith(prefix) for k in arrays):
      return prefix
  raise CheckpointError("big_vision checkpoint", other=[
      f"no LLM parameters: no key starts with {' or '.join(LLM_PREFIXES)}"])


def import_arrays(arrays: Mapping[str, np.ndarray], config,
                  what: str = "big_vision checkpoint") -> dict[str, np.ndarray]:
  """big_vision flat arrays -> our flat params in the scan layout (checked strictly)."""
  prefix = llm_prefix(arrays)
  flat = {k[len(prefix):]: np.asarray(v) for k, v in arrays.items() if k.startswith(prefix)}
  check_tree(flat, S.param_shapes(config, scan_layers=True), what)
  return flat


def load(path: str | Path, config, mesh: Mesh | None = None,
         rules: Sequence[tuple[str, Any]] = S.DEFAULT_RULES):
  """A big_vision `.npz` as params of decoder `config`, in its layout, `param_dtype` and
  shardings on `mesh`."""
  flat = import_arrays(read_npz(Path(path)), config, f"big_vision checkpoint {path}")
  if not config.scan_layers:
    flat = layout.to_loop(flat)
  return S.place(layout.unflatten(flat), config, mesh, rules)
