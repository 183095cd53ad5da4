"""Loading `configs/*.py` files outside absl flags (benchmarks, notebooks, tests).

A config file defines `get_config(arg=None)` returning an `ml_collections.ConfigDict`; the
spec "path/to/file.py:arg" passes `arg` to it, as `config_flags.DEFINE_config_file` does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def load(spec: str) -> ml_collections.ConfigDict:
  """`"configs/dualtoken_tiny.py"`, `"dualtoken_tiny"` (from the repo's configs/), or with `:arg`."""
  path, _, arg = str(spec).partition(":")
  file = Path(path)
  if not file.suffix:
    file = REPO_CONFIGS / f"{path}.py"
  if not file.is_file():
    raise FileNotFoundError(f"config file not found: {file}")
  module_spec = importlib.util.spec_from_file_location(file.stem, file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{file} does not define get_config(arg=None)")
  return module.get_config(arg) if arg else module.get_config()


def model_of(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The tokenizer config inside an experiment config (its `model` field) or the config itself."""
  return config.model if "model" in config else config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """big_vision-style config args: "res=256,stage=1" -> typed values (types from `defaults`).

  A bare word sets a boolean default to True ("runlocal"); unknown keys are an error naming the
  known ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config arg {key}={value!r}: expected true/false")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = type(default)(value)
  return out


def merge_saved(defaults: ml_collections.ConfigDict, saved) -> ml_collections.ConfigDict:
  """A saved config's JSON form (nested dicts and lists) over a copy of `defaults`.

  Fields the saved config lacks (added to the code since it was written) keep their defaults,
  nested configs are merged field by field, and JSON lists become tuples (as configs hold
  sequences) except where the default is a list.
  """
  if isinstance(saved, ml_collections.ConfigDict):
    saved = saved.to_dict()
  return ml_collections.ConfigDict(_merge(defaults.to_dict(), saved))


def _merge(defaults: dict, saved) -> dict:
  out = dict(defaults)
  for key, value in saved.items():
    default = out[key] if key in out else None
    if isinstance(value, dict) and isinstance(default, dict):
      out[key] = _merge(default, value)
    elif isinstance(default, list):
      out[key] = value
    else:
      out[key] = _tuples(value)
  return out


def _tuples(value):
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value
