"""`python -m dualtoken_jax.app`: a browser app (Gradio Blocks) for the tokenizer and the unified
model, an optional extra (`pip install -e .[app]`).

Three tabs: *Tokenizer* (an image -> its reconstruction, PSNR/SSIM, the reconstruction from
the first 1…D residual levels, the pixel and semantic code maps, the code budget, the codes as
the `tokenize` CLI's `.npz`), *Chat* (image + question -> the answer streamed token by token,
multi-turn, the `chat` CLI's prompt template) and *Generate* (caption -> images, the `generate`
CLI's sampling: the same seed gives the same images).

The app is a program, like `bench/`: nothing in the library imports it. It works offline by
construction: analytics and Gradio's version check are off, the theme uses system fonts, no
share link is made, and the page loads nothing but what the local server sends.

  models.py         which checkpoints to load (defaults: the README's demo workdirs) and why not
  inputs.py         the upload widget and image reading the tabs share
  tokenizer_tab.py  the Tokenizer tab (its pure parts: analysis, code-map HTML, code budget)
  chat_tab.py       the Chat tab
  generate_tab.py   the Generate tab
  page.py           the Blocks page (theme, offline settings) and `launch`
"""

import os

# Before gradio is imported anywhere: no telemetry, no version check, no HF Hub telemetry.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
