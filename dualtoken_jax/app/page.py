"""The app's page: the three tabs in one `gr.Blocks`, styled with system fonts only, and its
launch on a local address with Gradio's queue (long calls wait their turn, one model call per
tab at a time; the models are shared by every request).

Offline by construction: analytics (and with them Gradio's version check) are off, the theme
names only system fonts (no web font is fetched), no share link is made and no SSR node
server is started; the browser test checks that the page requests nothing but the local server.
"""

from __future__ import annotations

import gradio as gr

from dualtoken_jax.app import chat_tab, generate_tab, tokenizer_tab
from dualtoken_jax.data import decode, sample_photos

SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO_FONTS = ("ui-monospace", "Consolas", "monospace")
CSS = """
.code-maps { margin: 0.5em 0; }
.code-map-row { display: flex; flex-wrap: wrap; gap: 12px; }
.code-map { margin: 4px 0; }
.code-map figcaption { font-size: 0.8em; text-align: center; }
table.code-grid { border-collapse: collapse; margin: 0; }
table.code-grid td { width: 14px; height: 14px; padding: 0; border: 1px solid #fff; }
"""


def theme() -> gr.themes.Theme:
  return gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def build(tokenizer, mllm) -> gr.Blocks:
  """The page for a loaded tokenizer and unified model (`models.Loaded`; either may be missing)."""
  photos = sample_photos.sample_photo_paths()
  with gr.Blocks(title="dualtoken-jax", analytics_enabled=False) as page:
    gr.Markdown("# dualtoken-jax\nThe DualToken tokenizer and the unified model built on it.")
    with gr.Tabs():
      tokenizer_tab.build(tokenizer, photos)
      chat_tab.build(mllm, photos)
      generate_tab.build(mllm)
  return page


def launch(page: gr.Blocks, port: int, host: str = "127.0.0.1", block: bool = True):
  """Serves `page` at http://host:port/ (the bundled photos readable by the page). With
  `block=False` returns at once, the server running in a thread (`page.close()` stops it)."""
  page.queue(default_concurrency_limit=1)
  return page.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                     prevent_thread_lock=not block, show_error=True, quiet=True,
                     ssr_mode=False, pwa=False, mcp_server=False, theme=theme(), css=CSS,
                     allowed_paths=list(sample_photos.sample_photo_paths().values()),
                     max_file_size=decode.DEFAULT_MAX_BYTES, footer_links=[])
