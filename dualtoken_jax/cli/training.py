"""The command line of the two trainers (`train`, `train_mllm`): absl flags, a config file with
`--config.x.y=...` overrides, and the exit statuses: 75 after a preemption save
(`PREEMPTED_EXIT_CODE`), 2 for a config that cannot run (an unknown `--config.` field, or a
`ConfigError` from the trainer's `validate`: one line naming the field, no traceback)."""

from __future__ import annotations

import difflib
import sys
from typing import Callable, Sequence

from absl import app, flags
from absl import logging
from ml_collections import config_flags

from dualtoken_jax import config_files
from dualtoken_jax.cli import logs
from dualtoken_jax.training.loop import PREEMPTED_EXIT_CODE, Preempted


def run(train_and_evaluate: Callable, what: str) -> None:
  """Defines --config / --workdir (only when run as a program, so importing a program module
  has no side effects) and runs `train_and_evaluate(config, workdir)` under absl."""
  config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
  flags.DEFINE_string("workdir", None, f"where {what} go")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    del argv
    logs.setup()
    try:
      result = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except Preempted as e:  # checkpoint saved: re-running the same command resumes
      logging.warning("%s", e)
      sys.exit(PREEMPTED_EXIT_CODE)
    except config_files.ConfigError as e:
      print(f"error: config: {e}", file=sys.stderr)
      sys.exit(2)
    if result:
      logging.info("final evaluation: %s", result)

  app.run(main, flags_parser=parse_flags)


def parse_flags(argv: Sequence[str]):
  """absl's flag parsing, but an override of a field the config does not have
  (`--config.nonexistent=1`: a raw AttributeError from ml_collections) exits with one line
  naming the field and the closest existing ones."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    message = unknown_override(argv) or f"bad --config override: {e}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def unknown_override(argv: Sequence[str], config=None) -> str | None:
  """The first `--config.a.b=...` in `argv` naming no field of the config (`config`, default
  the file `--config` names), as a message with the closest existing fields; None if all exist."""
  if config is None:
    spec = _flag_value(argv, "--config")
    if spec is None:
      return None
    config = config_files.load(spec)
  fields = _paths(config)
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    if key in fields:
      continue
    close = difflib.get_close_matches(key, fields, n=3, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    return f"--config.{key}: the config has no field {key!r}{hint}"
  return None


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(name + "="):
      return arg.split("=", 1)[1]
    if arg == name and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _paths(config, prefix: str = "") -> list[str]:
  """Every dotted field path of `config`, nested configs included (both as a whole and inside)."""
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if hasattr(value, "items") and hasattr(value, "keys"):
      out.extend(_paths(value, f"{prefix}{key}."))
  return out
