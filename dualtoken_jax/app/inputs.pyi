"""The image inputs the tabs share: an upload widget whose file reaches the app unopened, and
its reading with the CLIs' decoder and eval geometry (`data.transforms.load_image`: shorter
side -> the model's size, centre crop; size limits; a clear message for a file that is not an
image).
"""

from __future__ import annotations

import os

import gradio as gr
import numpy as np

from dualtoken_jax.data.decode import SkipImage
from dualtoken_jax.data.transforms import load_image

from gradio.events import Dependency

class ImageFile(gr.Image):
  """`gr.Image` whose value reaches the app as the uploaded file's path, unopened, so that the
  one image decoder (`load_image`) reads it: its size limits apply and a file that is not an
  image gets a message naming it, instead of an error inside Gradio's own PIL call."""
  is_template = True  # rendered by gr.Image's front-end component

  def preprocess(self, payload):
    return None if payload is None else str(payload.path)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


def read_image(path: str | None, size: int, what: str = "image") -> np.ndarray:
  """An uploaded file as the model's input (size, size, 3) in [-1, 1]; gr.Error if it is not one."""
  if not path:
    raise gr.Error(f"Upload an {what} first (or pick a bundled photo).")
  try:
    return load_image(path, size)
  except (SkipImage, OSError) as e:
    raise gr.Error(f"{os.path.basename(path)} could not be used as an image: {e}") from e