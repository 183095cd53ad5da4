"""Output paths of the command-line programs, checked before any work is done.

`check(parser, "--output", path)` fails the way argparse does (one line naming the flag and the
path, exit status 2) when `path` cannot be written: so an unwritable output of a long run is
found in its first second, not after it. The check creates the missing parent directories (as
the write would) and writes and removes a probe file there, so it also catches read-only file
systems and quotas that permission bits do not show.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def problem(path: str | os.PathLike, *, directory: bool = False) -> str | None:
  """Why `path` (a file, or with `directory` a directory to write files into) cannot be
  written, or None if it can."""
  raw, path = os.fspath(path), Path(path)
  if directory:
    if path.exists() and not path.is_dir():
      return "exists and is not a directory"
    target = path
  else:
    if raw.endswith(("/", os.sep)) or path.is_dir():
      return "is a directory; give a file name"
    target = path.parent
  try:
    target.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    return f"cannot create the directory {target} ({e.strerror or e})"
  try:
    with tempfile.TemporaryFile(dir=target, prefix=".write_check"):
      pass
  except OSError as e:
    return f"cannot write in {target} ({e.strerror or e})"
  return None


def check(parser: argparse.ArgumentParser, flag: str, path: str | os.PathLike, *,
          directory: bool = False, suffixes: tuple[str, ...] = ()) -> None:
  """`parser.error` (exit status 2) naming `flag` and `path` unless `path` can be written; with
  `suffixes`, its extension must also be one of them."""
  if suffixes and Path(path).suffix.lower() not in suffixes:
    parser.error(f"{flag} {path}: expected a file name ending in {' or '.join(suffixes)}")
  why = problem(path, directory=directory)
  if why:
    parser.error(f"{flag} {path}: {why}")
