"""The Tokenizer tab: an image in, what the tokenizer makes of it out.

input crop | reconstruction with PSNR and SSIM (`metrics.image_quality`, on `data.images.to_unit`
as in evaluation), the reconstructions from the first 1…D pixel levels
(`DualTokenizer.decode_levels`: how detail arrives level by level), the pixel and semantic
code maps as coloured grids whose cells name their code ids on hover, the code budget (tokens
and bits per image) and the codes as a `.npz` in the `tokenize` CLI's format
(`data.code_shards.write_npz`). Images are read like the CLIs' inputs (`app.inputs`).
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import tempfile

import gradio as gr
import numpy as np

from dualtoken_jax.app.inputs import ImageFile, read_image
from dualtoken_jax.data import code_shards
from dualtoken_jax.data.images import to_uint8, to_unit
from dualtoken_jax.metrics import image_quality
from dualtoken_jax.models import config as model_config

DISPLAY_SIZE = 256  # small model images are shown enlarged (nearest neighbour, pixels visible)


@dataclasses.dataclass
class Analysis:
  image: np.ndarray           # (S, S, 3) float32 in [-1, 1]: what the tokenizer saw
  levels: np.ndarray          # (D, S, S, 3) float32: decoded from the first 1..D pixel levels
  psnr: np.ndarray            # (D,) dB of each level's decoding against the input
  ssim: float                 # of the full reconstruction
  pixel: np.ndarray           # (h, w, D_pix) int32
  semantic: np.ndarray        # (h, w, D_sem) int32

  @property
  def reconstruction(self) -> np.ndarray:
    return self.levels[-1]


def analyse(tokenizer, image: np.ndarray) -> Analysis:
  """Encodes one image (S, S, 3) in [-1, 1] and decodes it from every prefix of its pixel levels."""
  codes = tokenizer.encode(image[None])
  depth = tokenizer.config.vq_pix.depth
  pixel = np.repeat(np.asarray(codes.pixel), depth, axis=0)
  levels = np.asarray(tokenizer.decode_levels(pixel, np.arange(1, depth + 1)))
  target = np.broadcast_to(to_unit(image), levels.shape)
  decoded = to_unit(levels)
  return Analysis(image=image, levels=levels,
                  psnr=np.asarray(image_quality.psnr(target, decoded)),
                  ssim=float(image_quality.ssim(target[-1], decoded[-1])),
                  pixel=np.asarray(codes.pixel)[0], semantic=np.asarray(codes.semantic)[0])


def code_budget(config) -> dict[str, float]:
  """Tokens and bits per image of each branch: h·w·D codes of log2(K) bits each."""
  cells = model_config.grid_size(config) ** 2
  out = {}
  for name, q in (("pixel", config.vq_pix), ("semantic", config.vq_sem)):
    out[f"{name}_tokens"] = cells * q.depth
    out[f"{name}_bits"] = cells * q.depth * math.log2(q.codebook_size)
  out["tokens"] = out["pixel_tokens"] + out["semantic_tokens"]
  out["bits"] = out["pixel_bits"] + out["semantic_bits"]
  return out


def code_colour(code: int) -> str:
  """A colour per code id: hues a golden angle apart (neighbouring ids look different),
  three lightness steps."""
  return f"hsl({code * 137.508 % 360:.1f}, 70%, {(40, 55, 70)[code % 3]}%)"


def code_maps_html(codes: np.ndarray, branch: str) -> str:
  """One coloured grid per residual level of (h, w, D) codes; each cell's title (its hover
  text) names the level, the position and the code id, and every level's id there."""
  h, w, depth = codes.shape
  grids = []
  for level in range(depth):
    rows = []
    for r in range(h):
      cells = []
      for c in range(w):
        code = int(codes[r, c, level])
        title = (f"{branch} level {level + 1}, row {r}, col {c}: code {code} "
                 f"(levels 1..{depth}: {', '.join(str(int(x)) for x in codes[r, c])})")
        cells.append(f'<td title="{html.escape(title)}" data-code="{code}" '
                     f'style="background:{code_colour(code)}"></td>')
      rows.append("<tr>" + "".join(cells) + "</tr>")
    grids.append(f'<figure class="code-map"><table class="code-grid" data-branch="{branch}" '
                 f'data-level="{level + 1}">{"".join(rows)}</table>'
                 f"<figcaption>level {level + 1}</figcaption></figure>")
  return (f'<div class="code-maps"><strong>{branch} codes</strong> ({h}×{w}×{depth}; hover a '
          f'cell for its code ids)<div class="code-map-row">{"".join(grids)}</div></div>')


def enlarge(image: np.ndarray, size: int = DISPLAY_SIZE) -> np.ndarray:
  """A uint8 image enlarged by an integer factor (nearest neighbour) to about `size` pixels."""
  k = max(1, size // image.shape[0])
  return np.repeat(np.repeat(image, k, axis=0), k, axis=1)


def write_codes(analysis: Analysis, key: str) -> str:
  """The codes as the `tokenize` CLI writes them (keys, pixel, semantic), in a fresh temp dir."""
  stem = os.path.splitext(os.path.basename(key))[0] or "image"
  path = os.path.join(tempfile.mkdtemp(prefix="dualtoken_app_codes_"), f"{stem}_codes.npz")
  code_shards.write_npz(path, [key], analysis.pixel[None], analysis.semantic[None])
  return path


def summary(analysis: Analysis, budget: dict[str, float]) -> str:
  return (f"**PSNR {analysis.psnr[-1]:.2f} dB · SSIM {analysis.ssim:.3f}** (reconstruction vs "
          f"input, [0, 1] range)  \n"
          f"{budget['tokens']:.0f} tokens per image ({budget['pixel_tokens']:.0f} pixel + "
          f"{budget['semantic_tokens']:.0f} semantic), {budget['bits']:.0f} bits per image "
          f"({budget['bits'] / 8 / 1024:.2f} KiB)")


def build(loaded, photos: dict[str, str]) -> None:
  """The tab's components and events (inside a `gr.Blocks`)."""
  with gr.Tab("Tokenizer", id="tokenizer"):
    if loaded.model is None:
      gr.Markdown(loaded.problem, elem_id="tokenizer-problem")
      return
    tok = loaded.model
    size, depth = tok.config.image_size, tok.config.vq_pix.depth
    budget = code_budget(tok.config)
    gr.Markdown(f"Tokenizer: `{loaded.source}` ({size}×{size} input, {tok.grid}×{tok.grid} grid, "
                f"pixel K={tok.config.vq_pix.codebook_size} D={depth}, semantic "
                f"K={tok.config.vq_sem.codebook_size} D={tok.config.vq_sem.depth}). Drop or "
                "upload an image, or pick a bundled photo.")
    with gr.Row():
      upload = ImageFile(label="Image (drop or upload)", type="filepath", image_mode=None,
                         sources=["upload", "clipboard"], format="png", height=300,
                         elem_id="tokenizer-upload")
      seen = gr.Image(label=f"Input ({size}×{size} centre crop)", interactive=False,
                      format="png", height=300, buttons=["download", "fullscreen"],
                      elem_id="tokenizer-input")
      recon = gr.Image(label="Reconstruction", interactive=False, format="png", height=300,
                       buttons=["download", "fullscreen"], elem_id="tokenizer-reconstruction")
    photo = gr.Dropdown(choices=list(photos), value=None, label="…or pick a bundled photo",
                        elem_id="tokenizer-photo")
    metrics = gr.Markdown(elem_id="tokenizer-metrics")
    levels = gr.Gallery(label=f"Decoded from the first 1…{depth} residual pixel levels",
                        columns=depth, format="png", height=320, object_fit="contain",
                        buttons=["download", "fullscreen"], elem_id="tokenizer-levels")
    maps = gr.HTML(elem_id="tokenizer-code-maps")
    download = gr.File(label="Codes (.npz, the tokenize CLI's format)",
                       elem_id="tokenizer-download")

    def run(path):
      if path is None:
        return None, None, "", [], "", None
      analysis = analyse(tok, read_image(path, size))
      shown = [enlarge(to_uint8(x), 128) for x in analysis.levels]
      captions = [f"levels 1..{k + 1}: {p:.2f} dB" for k, p in enumerate(analysis.psnr)]
      return (enlarge(to_uint8(analysis.image)), enlarge(to_uint8(analysis.reconstruction)),
              summary(analysis, budget), list(zip(shown, captions)),
              code_maps_html(analysis.pixel, "pixel") + code_maps_html(analysis.semantic,
                                                                        "semantic"),
              write_codes(analysis, os.path.basename(path)))

    photo.change(lambda key: photos.get(key) if key else None, photo, upload)
    upload.change(run, upload, [seen, recon, metrics, levels, maps, download],
                  concurrency_limit=1)
