"""The Generate tab: a caption -> N images, with the `generate` CLI's sampling and its
conventions (CFG scale 0 = no guidance, top-k 0 = off, top-p 1 = off): one
`UnifiedModel.generate_images` call with the same arguments, so the same seed gives the same
images as the CLI.
"""

from __future__ import annotations

import gradio as gr

from dualtoken_jax.data.images import to_uint8
from dualtoken_jax.models import config as model_config

MAX_IMAGES = 8


def generation_options(cfg_scale, temperature, top_k, top_p, seed) -> dict:
  """Control values -> `generate_images`' keyword arguments, exactly as the generate CLI maps
  its flags (`--cfg_scale 0` and `--top_k 0` turn them off)."""
  return dict(cfg_scale=float(cfg_scale) or None, temperature=float(temperature),
              top_k=int(top_k) or None, top_p=float(top_p), seed=int(seed or 0))


def build(loaded) -> None:
  with gr.Tab("Generate", id="generate"):
    if loaded.model is None:
      gr.Markdown(loaded.problem, elem_id="generate-problem")
      return
    model = loaded.model
    tok = model.config.model.tokenizer
    g = model_config.grid_size(tok)
    positions = f"{g}×{g} positions × ({tok.vq_pix.depth} pixel + {tok.vq_sem.depth} semantic) codes"
    gr.Markdown(f"Unified model: `{loaded.source}`. Each image is {positions}, sampled with "
                "classifier-free guidance (spec D.3 defaults).")
    with gr.Row():
      with gr.Column(scale=1):
        prompt = gr.Textbox(label="Caption", placeholder="a photo of a cat",
                            elem_id="generate-prompt")
        n = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="images")
        cfg_scale = gr.Slider(0.0, 10.0, value=3.0, step=0.1, label="CFG scale (0 = off)")
        temperature = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="temperature (0 = greedy)")
        top_k = gr.Slider(0, max(tok.vq_pix.codebook_size, tok.vq_sem.codebook_size, 900),
                          value=900, step=1, label="top-k (0 = off)")
        top_p = gr.Slider(0.05, 1.0, value=0.96, step=0.01, label="top-p (1 = off)")
        seed = gr.Number(0, precision=0, label="seed", elem_id="generate-seed")
        go = gr.Button("Generate", variant="primary", elem_id="generate-button")
      with gr.Column(scale=2):
        gallery = gr.Gallery(label="Generated", columns=4, format="png", height=420,
                             object_fit="contain", buttons=["download", "fullscreen"],
                             elem_id="generate-gallery")
        status = gr.Markdown(elem_id="generate-status")

    def run(caption, n, cfg_scale, temperature, top_k, top_p, seed,
            progress=gr.Progress()):
      caption = (caption or "").strip()
      if not caption:
        raise gr.Error("Type a caption first.")
      options = generation_options(cfg_scale, temperature, top_k, top_p, seed)
      progress(0.0, desc=f"sampling {int(n)} image(s): {positions} each")
      try:
        out = model.generate_images(caption, int(n), **options)
      except ValueError as e:
        raise gr.Error(f"Cannot generate: {e}") from e
      progress(1.0, desc="decoded")
      images = [(to_uint8(x), f"#{i}") for i, x in enumerate(out["images"])]
      return images, (f"{len(images)} image(s) for “{caption}”, seed {options['seed']} (the "
                      f"generate CLI with `--seed {options['seed']}` gives the same)")

    go.click(run, [prompt, n, cfg_scale, temperature, top_k, top_p, seed], [gallery, status],
             concurrency_limit=1)
    prompt.submit(run, [prompt, n, cfg_scale, temperature, top_k, top_p, seed],
                  [gallery, status], concurrency_limit=1)
