"""Loading `configs/*.py` files outside absl flags (benchmarks, notebooks, tests).

A config file defines `get_config(arg=None)` returning an `ml_collections.ConfigDict`; the
spec "path/to/file.py:arg" passes `arg` to it, as `config_flags.DEFINE_config_file` does.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Mapping

import ml_collections

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
  """A config that cannot describe a working model or run; the message names the field. The one
  config error of the project: the tokenizer, decoder, MLLM and training configs all raise it
  (`models.config`, `llm.config` and `mllm.config` re-export it as `ConfigError`)."""


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


def check(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def check_positive_ints(config, *paths: str) -> None:
  """Each dotted field must be an integer >= 1 (steps, sizes, cadences)."""
  for path in paths:
    value = get_path(config, path)
    check(isinstance(value, int) and value >= 1, f"{path} must be an integer >= 1, got {value!r}")


def check_optimizer(config, name: str) -> None:
  """`config[name]` (an AdamW + warm-up section): lr finite and > 0, warmup_steps in
  [0, total_steps], b1 and b2 in [0, 1), eps > 0 and weight_decay, grad_clip_norm >= 0 where
  present."""
  o = config[name]
  check(isinstance(o.lr, (int, float)) and math.isfinite(o.lr) and o.lr > 0,
        f"{name}.lr must be finite and > 0, got {o.lr}")
  check(0 <= o.warmup_steps <= config.total_steps,
        f"{name}.warmup_steps {o.warmup_steps} must be in [0, total_steps={config.total_steps}]")
  check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"{name}.b1 and {name}.b2 must be in [0, 1), got "
                                           f"{o.b1}, {o.b2}")
  if "eps" in o:
    check(o.eps > 0, f"{name}.eps must be > 0, got {o.eps}")
  for field in ("weight_decay", "grad_clip_norm"):
    if field in o:
      check(o[field] >= 0, f"{name}.{field} must be >= 0 (grad_clip_norm 0 = off), got {o[field]}")


def get_path(config, path: str):
  """`config.a.b` for path "a.b"."""
  for part in path.split("."):
    config = config[part]
  return config


def rederive(config, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Re-derives fields after what they derive from changed (a recipe's `stage`): each dotted
  path of `new` whose value in `config` is still its `old` derived value is set to the new one;
  a field holding anything else was set on purpose and is kept. Returns the paths changed."""
  def same(a, b):
    seq = (list, tuple)
    return list(a) == list(b) if isinstance(a, seq) and isinstance(b, seq) else a == b
  changed = []
  for path, value in new.items():
    if same(get_path(config, path), old[path]) and not same(value, old[path]):
      *parents, last = path.split(".")
      holder = get_path(config, ".".join(parents)) if parents else config
      holder[last] = value
      changed.append(path)
  return changed


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
