"""A small, fixed set of real photos shipped inside installed Python packages.

scikit-image, scikit-learn and matplotlib each bundle a few photographs as package data. They
make a deterministic, download-free dataset for demos, smoke runs and tests of the whole
decode -> crop -> batch path (mixed formats and sizes, one grayscale PNG). Packages that are
not installed are skipped; the files are located without importing the packages.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Sequence

from dualtoken_jax.data import decode
from dualtoken_jax.data import records

# (package, path inside the package). Order is the source order.
SAMPLE_PHOTOS = (
    ("skimage", "data/astronaut.png"),        # 512x512 RGB
    ("skimage", "data/chelsea.png"),          # 451x300 RGB (the cat)
    ("skimage", "data/coffee.png"),           # 600x400 RGB
    ("skimage", "data/rocket.jpg"),           # 640x427 RGB JPEG
    ("skimage", "data/camera.png"),           # 512x512 grayscale (mode L)
    ("skimage", "data/motorcycle_left.png"),  # RGB, landscape
    ("skimage", "data/hubble_deep_field.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),  # portrait
)


def sample_photo_paths(names: Sequence[str] | None = None) -> dict[str, str]:
  """{"package/file": absolute path} of the bundled photos that are installed.

  Args:
    names: restrict to these keys (e.g. "skimage/astronaut.png"); None = all.
  """
  found = {}
  for package, relpath in SAMPLE_PHOTOS:
    key = f"{package}/{os.path.basename(relpath)}"
    if names is not None and key not in names:
      continue
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
      continue
    path = os.path.join(spec.submodule_search_locations[0], relpath)
    if os.path.isfile(path):
      found[key] = path
  if names is not None and set(names) - set(found):
    raise FileNotFoundError(f"sample photos not available: {sorted(set(names) - set(found))}; "
                            f"known: {[f'{p}/{os.path.basename(r)}' for p, r in SAMPLE_PHOTOS]}")
  return found


class SamplePhotosSource:
  """The installed sample photos as a random-access source of encoded image files."""

  def __init__(self, names: Sequence[str] | None = None):
    self._paths = sample_photo_paths(names)
    if not self._paths:
      raise FileNotFoundError("no sample photos found; install scikit-image, scikit-learn or "
                              "matplotlib (looked for "
                              f"{[f'{p}/{r}' for p, r in SAMPLE_PHOTOS]})")
    self._keys = list(self._paths)

  def __len__(self) -> int:
    return len(self._keys)

  def __getitem__(self, index: int) -> dict[str, Any]:
    key = self._keys[index]
    try:
      return {"key": key, "image_bytes": decode.read_image_file(self._paths[key])}
    except decode.SkipImage as e:
      return records.skip_record(e.reason, key, str(e))
    except OSError as e:
      return records.read_failure(key, e)

  def __repr__(self) -> str:
    return f"SamplePhotosSource({self._keys})"
