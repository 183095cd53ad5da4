"""Where a DualToken tokenizer's variables come from and go to, as host numpy trees.

Every loader returns `(config, variables)` (or just the variables, when the config is given),
with variables `{"params", "vq_stats"}` as numpy arrays in the model's layout (`scan_layers`) and
dtypes; `DualTokenizer` and the trainers put them on devices as they need.

  load_reference      the PyTorch reference's checkpoint + config.json (`bridges.reference`)
  load_saved          this project's format: config.json + an Orbax `state/` (`save`)
  load_training_run   a `dualtoken_jax.train` run (its newest checkpoint, or a step directory)
  load                a saved directory or a training run
  init_with_siglip    fresh variables whose SigLIP towers come from real weights

Every loader checks that the weights it read are finite (`tensor_files.check_finite`:
`CheckpointError` naming the file and the first bad keys); `save` writes a sha256 manifest
(`checksums.json`) that `load_saved` verifies, naming any file whose bytes changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from dualtoken_jax.bridges import layout
from dualtoken_jax.bridges import reference
from dualtoken_jax.bridges import siglip
from dualtoken_jax.bridges import tensor_files
from dualtoken_jax.bridges.tensor_files import read_tensors, write_safetensors
from dualtoken_jax.models import config as model_config
from dualtoken_jax.models.dualtoken import abstract_variables, init_variables
from dualtoken_jax.training import checkpoints

_CONFIG, _STATE = "config.json", "state"


def load_reference(checkpoint_path: str | os.PathLike,
                   config_json_path: str | os.PathLike | None = None):
  """The PyTorch reference's checkpoint (`.pt` `{"state_dict": …}` or `.safetensors`) and its
  config.json (default: `config.json` beside the checkpoint). Strict: every key must match."""
  config_json_path = Path(config_json_path or Path(checkpoint_path).with_name("config.json"))
  if not config_json_path.is_file():
    raise FileNotFoundError(f"reference config.json not found: {config_json_path}")
  config = reference.config_from_reference(json.loads(config_json_path.read_text()))
  abstract = layout.flatten(abstract_variables(config))
  expected = layout.loop_shapes({k: v.shape for k, v in abstract.items()})
  flat = reference.import_state_dict(read_tensors(checkpoint_path), config, expected)
  tensor_files.check_finite(flat, f"reference checkpoint {checkpoint_path}")
  return config, _in_model_layout(flat, abstract, config)


def export_reference(path: str | os.PathLike, config, variables: Any,
                     config_json_path: str | os.PathLike | None = None) -> None:
  """Writes the reference layout: `path` (.safetensors) and its config.json (default: beside it)."""
  path = Path(path)
  if path.suffix != ".safetensors":
    raise ValueError(f"export_reference writes safetensors; got {path}")
  flat = layout.to_loop(layout.flatten(layout.to_host(variables)))
  write_safetensors(path, reference.export_state_dict(flat, config))
  cfg_path = Path(config_json_path or path.with_name("config.json"))
  cfg_path.write_text(json.dumps(reference.config_to_reference(config), indent=1))


def save(path: str | os.PathLike, config, variables: Any, overwrite: bool = False) -> None:
  """Writes config.json, an Orbax checkpoint of the variables and, last, `checksums.json` (the
  sha256 of every weight file under state/; config.json stays editable) under `path`."""
  path = Path(path).absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  path.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / _STATE, variables, force=overwrite)
  checkpointer.wait_until_finished()
  (path / _CONFIG).write_text(config.to_json_best_effort(indent=2))
  tensor_files.write_checksums(path, under=_STATE)


def load_saved(path: str | os.PathLike):
  """This project's own format, as `save` writes it (config.json + Orbax `state/`), verified
  against its `checksums.json` (directories saved before manifests existed load unverified)."""
  path = Path(path).absolute()
  if not (path / _CONFIG).is_file() or not (path / _STATE).is_dir():
    raise FileNotFoundError(f"{path} is not a saved DualTokenizer (expected config.json and state/)")
  tensor_files.verify_checksums(path)
  config = model_config.from_dict(json.loads((path / _CONFIG).read_text()))
  variables = ocp.StandardCheckpointer().restore(path / _STATE,
                                                 _on_local_device(abstract_variables(config)))
  tensor_files.check_finite(variables, f"saved DualTokenizer {path}")
  return config, layout.to_host(variables)


def load_training_run(path: str | os.PathLike):
  """The tokenizer of a `dualtoken_jax.train` run (its newest checkpoint, or the step
  directory `path`): params and EMA codebooks, without optimiser, teacher or discriminator."""
  step_dir, config = checkpoints.read_run(path, "tokenizer")
  # merged over today's defaults first: a run saved before a model field existed still loads
  model = model_config.from_dict(ml_collections.ConfigDict(config).model)
  abstract = _on_local_device(abstract_variables(model))
  variables = checkpoints.restore_subtrees(step_dir, {
      "params": abstract["params"], "vq_stats": abstract["vq_stats"]})
  return model, layout.to_host(variables)


def _on_local_device(abstract):
  """Restore targets on this process's first device: the saved sharding (or `jax.devices()[0]`)
  may belong to another process of a multi-process job; the loaders return numpy anyway."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)


def load(path: str | os.PathLike):
  """A `save`d tokenizer directory, or a tokenizer training run (workdir or step directory)."""
  if (Path(path) / _CONFIG).is_file():
    return load_saved(path)
  return load_training_run(path)


def init_with_siglip(config, siglip_path: str | os.PathLike, seed: int = 0) -> dict[str, Any]:
  """New variables whose SigLIP towers come from real weights and everything DualToken adds
  is randomly initialised (from `seed`): the starting point of training. `siglip_path`: a
  Hugging Face SigLIP directory / `.safetensors`, or a big_vision `.npz` (optionally
  `file.npz:img`)."""
  fresh = layout.flatten(layout.to_host(init_variables(config, jax.random.key(seed))))
  towers = layout.loop_shapes({k[len("params/"):]: v.shape for k, v in fresh.items()
                               if k.startswith(("params/img/", "params/txt/"))
                               or k in ("params/t", "params/b")})
  if str(siglip_path).split(":")[0].endswith(".npz"):
    loaded = siglip.load_big_vision(str(siglip_path), towers)
  else:
    loaded = siglip.load_hf(siglip_path, config.vision, config.text, towers)
  tensor_files.check_finite(loaded, f"SigLIP checkpoint {siglip_path}")
  flat = layout.to_loop(fresh)
  flat.update({f"params/{k}": v for k, v in loaded.items()})
  return _in_model_layout(flat, fresh, config)


def _in_model_layout(flat_loop, abstract_flat, config) -> dict[str, Any]:
  """Loop-layout flat variables -> the nested tree in the config's layout and dtypes."""
  flat = layout.to_scan(flat_loop) if config.scan_layers else flat_loop
  return layout.unflatten(layout.cast_like(flat, abstract_flat))
