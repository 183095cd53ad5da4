"""`DecoderLM`: a text decoder (Gemma 1/2/3, Qwen2/2.5, Llama 2/3) with its params, loaders,
forward, generation and savers. `GemmaLM` is the same class under its Gemma name.

    lm = DecoderLM.from_hf(hf_dir)               # HF Gemma 1/2/3, Qwen2/2.5 or Llama checkpoint
    lm = DecoderLM.from_orbax(path, config)      # official Gemma Flax/Orbax checkpoint
    lm = DecoderLM.from_big_vision(npz, config)  # PaliGemma / big_vision `.npz` (its LLM)
    lm = DecoderLM.from_pretrained(path)         # what `lm.save(path)` wrote
    lm.logits(tokens)                            # (B, T, V) float32, causal
    lm.generate(prompt, max_new_tokens=32, temperature=0.7, top_p=0.95, seed=1)
    lm.save(path); lm.export_hf(path); lm.export_orbax(path)

With `mesh=` (axes ('data', 'fsdp', 'tensor')) every parameter is placed in the sharding its
logical axes give under `rules`; forward and generation then run sharded by XLA.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dualtoken_jax.bridges import hf_config
from dualtoken_jax.bridges import gemma_bigvision
from dualtoken_jax.bridges import gemma_hf
from dualtoken_jax.bridges import gemma_orbax
from dualtoken_jax.bridges import layout as param_layout
from dualtoken_jax.bridges.tensor_files import check_tree
from dualtoken_jax.llm import config as C
from dualtoken_jax.llm import decoding
from dualtoken_jax.llm import masks
from dualtoken_jax.llm import sampling
from dualtoken_jax.llm import sharding as S
from dualtoken_jax.llm.gemma import GemmaDecoder, frozen

_CONFIG_FILE, _PARAMS_DIR = "config.json", "params"


@functools.partial(jax.jit, static_argnames=("model", "return_hidden"))
def _forward(model: GemmaDecoder, params, tokens, input_mask, return_hidden: bool = False):
  positions = masks.positions_from_mask(input_mask)
  attn_mask = masks.causal_padding_mask(input_mask)
  return model.apply({"params": params}, tokens, positions, attn_mask, return_hidden=return_hidden)


class DecoderLM:
  """A decoder config, its params (a nested dict of jax arrays) and the mesh they live on.

  The params must be the config's tree (names and shapes, in its `scan_layers` layout), or
  `CheckpointError` lists every missing, unexpected and misshaped one.
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Any, mesh: Mesh | None = None,
               rules: Sequence[tuple[str, Any]] = S.DEFAULT_RULES):
    C.validate(config)
    check_tree(param_layout.flatten(params), S.param_shapes(config), "DecoderLM params",
               labels=("params", "config"))
    self.config = config
    self.params = params
    self.mesh = mesh
    self.rules = tuple(rules)
    self.model = GemmaDecoder(frozen(config))

  # ---------------------------------------------------------------- constructors
  @classmethod
  def init(cls, config, seed: int = 0, mesh: Mesh | None = None, rules=S.DEFAULT_RULES):
    """Randomly initialised weights, created in their shardings."""
    return cls(config, S.init_params(config, seed, mesh, rules), mesh, rules)

  @classmethod
  def from_hf(cls, path: str | Path, *, mesh: Mesh | None = None, rules=S.DEFAULT_RULES,
              **overrides):
    """A HF checkpoint directory (config.json + model.safetensors or a sharded index); the
    family (Gemma 1/2/3, Qwen2/2.5, Llama 2/3) comes from its `model_type` / `architectures`.

    `overrides` set config fields, e.g. dtype="bfloat16", scan_layers=True. Params are cast
    to `param_dtype` (float32 unless overridden, whatever the file stores). The weights pass
    through host memory once: tensors are read from the (possibly sharded) safetensors as each
    is converted, then placed one parameter at a time into its sharding (`gemma_hf.load_params`).
    """
    config = hf_config.config_from_hf(gemma_hf.read_config(path), **overrides)
    return cls(config, gemma_hf.load_params(path, config, mesh, rules), mesh, rules)

  @classmethod
  def from_orbax(cls, path: str | Path, config, *, mesh: Mesh | None = None,
                 rules=S.DEFAULT_RULES, seed: int = 0):
    """An official Gemma Flax checkpoint (FLAT, STACKED or NESTED), restored into shardings.
    `seed` initialises embedding rows for tokens the checkpoint lacks."""
    return cls(config, gemma_orbax.load(path, config, mesh, rules, seed), mesh, rules)

  @classmethod
  def from_big_vision(cls, path: str | Path, config, *, mesh: Mesh | None = None,
                      rules=S.DEFAULT_RULES):
    """The LLM of a PaliGemma / big_vision `.npz` (`params/llm/...`, stacked layers), strictly;
    `config` gives the architecture (e.g. `get_config("gemma_2b", vocab_size=257_152)`)."""
    return cls(config, gemma_bigvision.load(path, config, mesh, rules), mesh, rules)

  @classmethod
  def from_pretrained(cls, path: str | Path, *, mesh: Mesh | None = None, rules=S.DEFAULT_RULES,
                      **overrides):
    """What `save` wrote; `overrides` may change execution fields (dtype, scan_layers, ...)."""
    path = Path(path).absolute()
    saved = config_from_json((path / _CONFIG_FILE).read_text())
    abstract = S.abstract_params(saved, mesh, rules)
    params = ocp.StandardCheckpointer().restore(path / _PARAMS_DIR, abstract)
    config = C.replace(saved, **overrides)
    if config.scan_layers != saved.scan_layers or config.param_dtype != saved.param_dtype:
      params = relayout(params, config, mesh, rules)
    return cls(config, params, mesh, rules)

  # ---------------------------------------------------------------- compute
  def forward(self, tokens, input_mask=None, return_hidden: bool = False):
    """(logits (B, T, V) float32, {"pre_logits", "hidden" (L+1, B, T, D)}) of a causal pass.
    `input_mask` (B, T) marks real tokens when rows are padded (left or right)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones(tokens.shape, bool) if input_mask is None else jnp.asarray(input_mask, bool)
    return _forward(self.model, self.params, tokens, mask, return_hidden)

  def logits(self, tokens, input_mask=None):
    """(B, T, V) float32 logits of a causal pass over int tokens (B, T)."""
    return self.forward(tokens, input_mask)[0]

  def generate(self, prompt, max_new_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0, *,
               prompt_mask=None, pad_id: int | None = None,
               eos_ids: Sequence[int] | None = None, return_logits: bool = False):
    """Samples `max_new_tokens` after each prompt; returns (B, P + max_new_tokens) int32.

    Greedy when temperature is 0; otherwise temperature / top-k / top-p sampling, reproducible
    for a given `seed`. Rows of different lengths: pass `prompt_mask` (B, P) (True on real
    tokens, padding on either side) or `pad_id` (tokens equal to it are padding). A row stops
    after an end-of-sequence id (`eos_ids`, default the config's; `()` never stops) and is
    padded with the config's pad id from there. `return_logits` also returns the
    (B, max_new_tokens, V) float32 logits each new token was drawn from.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2:
      raise ValueError(f"prompt must be (batch, length) int tokens, got shape {prompt.shape}")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    mask = (decoding.default_prompt_mask(prompt, pad_id) if prompt_mask is None
            else jnp.asarray(prompt_mask, bool))
    temperature, top_k, top_p = sampling.check_options(temperature, top_k, top_p)
    eos = tuple(self.config.eos_ids if eos_ids is None else eos_ids)
    return decoding.generate(
        self.model, self.params, prompt, mask, jax.random.key(seed),
        max_new_tokens=int(max_new_tokens), temperature=jnp.float32(temperature),
        top_k=jnp.int32(top_k), top_p=jnp.float32(top_p), eos_ids=jnp.asarray(eos, jnp.int32),
        pad_id=jnp.int32(self.config.pad_id), return_logits=bool(return_logits))

  # ---------------------------------------------------------------- savers
  def save(self, path: str | Path) -> None:
    """This project's format: config.json + an Orbax checkpoint of the params (`params/`)."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / _PARAMS_DIR, self.params)  # every host writes its shards
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
      (path / _CONFIG_FILE).write_text(self.config.to_json(indent=2))

  def export_hf(self, path: str | Path) -> None:
    """A HF `*ForCausalLM` directory (config.json + safetensors), in `param_dtype`. The params
    are gathered to every host (safetensors are written whole); process 0 writes."""
    params = self._host_loop_params()
    if jax.process_index() == 0:
      gemma_hf.save(path, params, self.config)

  def export_orbax(self, path: str | Path, layout: str | None = None) -> None:
    """An official-style Gemma Orbax checkpoint: "flat" (as released; the default), "stacked"
    or "nested"."""
    gemma_orbax.save(path, self.params, self.config, layout or gemma_orbax.FLAT)

  def _host_loop_params(self) -> dict[str, np.ndarray]:
    flat = {k: np.asarray(v if getattr(v, "is_fully_addressable", True)
                          else multihost_utils.process_allgather(v, tiled=True))
            for k, v in param_layout.flatten(self.params).items()}
    return param_layout.to_loop(flat) if param_layout.is_scanned(flat) else flat


GemmaLM = DecoderLM  # the Gemma name of the same class


def relayout(params, config, mesh: Mesh | None = None, rules=S.DEFAULT_RULES):
  """Params in either layout -> the config's layout and `param_dtype`, in its shardings."""
  target = S.shardings_of(S.abstract_params(config, mesh, rules))
  dtype = np.dtype(config.param_dtype)

  def convert(params):
    flat = param_layout.flatten(params)
    if param_layout.is_scanned(flat) != config.scan_layers:
      flat = (param_layout.to_scan(flat, config.depth, jnp.stack) if config.scan_layers
              else param_layout.to_loop(flat))
    return param_layout.unflatten({k: v.astype(dtype) for k, v in flat.items()})

  return jax.jit(convert, out_shardings=target)(params)


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """Reads `ConfigDict.to_json()` output back (see `config.from_dict`)."""
  return C.from_dict(json.loads(text))
