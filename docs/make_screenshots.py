"""Screenshots of the browser app on the README's demo checkpoints, for the README.

  pip install -e .[app] playwright && apt-get install -y chromium
  python docs/make_screenshots.py [--out docs] [--port 7870]

Starts `python -m dualtoken_jax.app` (its defaults: workdirs/demo and workdirs/mllm_demo, made
by the README's demo commands) in a subprocess, drives Debian's chromium through playwright
(no `playwright install`: nothing is downloaded) through the three tabs, and writes
OUT/app_tokenizer.png, OUT/app_chat.png and OUT/app_generate.png.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

from dualtoken_jax.data import sample_photos

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def wait_for(url: str, server: subprocess.Popen, seconds: float = 300) -> None:
  end = time.time() + seconds
  while time.time() < end:
    if server.poll() is not None:
      raise SystemExit(f"the app exited with status {server.returncode}")
    try:
      urllib.request.urlopen(url, timeout=2)
      return
    except OSError:
      time.sleep(1)
  raise SystemExit(f"the app did not answer at {url} within {seconds:.0f} s")


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="docs")
  p.add_argument("--port", type=int, default=7870)
  p.add_argument("--chromium", default="/usr/bin/chromium")
  args = p.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  photos = sample_photos.sample_photo_paths()
  url = f"http://127.0.0.1:{args.port}"
  server = subprocess.Popen([sys.executable, "-m", "dualtoken_jax.app", "--port", str(args.port)])
  try:
    wait_for(url, server)
    with sync_playwright() as pw:
      browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
      page = browser.new_page(viewport={"width": 1280, "height": 900})
      page.set_default_timeout(120_000)
      page.goto(url)
      page.locator("#tokenizer-upload input[type=file]").set_input_files(
          photos["skimage/astronaut.png"])
      page.locator("#tokenizer-metrics").get_by_text("PSNR").wait_for()
      page.locator("#tokenizer-levels img").last.wait_for()
      page.screenshot(path=str(out / "app_tokenizer.png"), full_page=True)

      page.get_by_role("tab", name="Chat").click()
      page.locator("#chat-image input[type=file]").set_input_files(photos["skimage/chelsea.png"])
      page.locator("#chat-image img").first.wait_for()
      for question in ("What does this image show?", "Describe the image."):
        page.locator("#chat-question textarea").fill(question)
        page.locator("#chat-send").click()
        page.locator("#chat-send:disabled").wait_for()  # answering
        page.locator("#chat-send:enabled").wait_for()   # answered
      page.screenshot(path=str(out / "app_chat.png"), full_page=True)

      page.get_by_role("tab", name="Generate").click()
      page.locator("#generate-prompt textarea").fill("a photo of a cat")
      page.get_by_label("images").first.fill("4")
      page.locator("#generate-button").click()
      page.locator("#generate-status").get_by_text("image(s) for").wait_for()
      page.screenshot(path=str(out / "app_generate.png"), full_page=True)
      browser.close()
  finally:
    server.terminate()
    server.wait(timeout=30)
  for name in ("app_tokenizer.png", "app_chat.png", "app_generate.png"):
    print(f"wrote {out / name}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
