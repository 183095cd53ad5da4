"""The browser app (`dualtoken_jax.app`) and the library pieces it added: decoding from the first
k residual levels, streamed answers, multi-turn prompts, the code maps and budget, the `.npz`
download, the messages for missing or wrong checkpoints and for files that are not images.
The browser tests (`test_browser_*`) drive the running app in Debian's chromium through
Playwright; they skip only when chromium or playwright is missing."""

from __future__ import annotations

import argparse
import contextlib
import html.parser
import io

import jax
import numpy as np
import pytest

gr = pytest.importorskip("gradio", reason="the app extra is not installed (pip install -e .[app])")

import app_testdata as A  # pylint: disable=g-import-not-at-top
import mllm_testdata as T
from dualtoken_jax import config_files, tokenize
from dualtoken_jax.app import chat_tab, generate_tab, inputs, models, tokenizer_tab
from dualtoken_jax.data import images as image_utils
from dualtoken_jax.data import load_image
from dualtoken_jax.mllm import config as C
from dualtoken_jax.mllm import sequence
from dualtoken_jax.mllm.inference import UnifiedModel
from dualtoken_jax.models.dualtoken import DualToken
from dualtoken_jax.tokenizer import DualTokenizer

PHOTO = "skimage/chelsea.png"


@pytest.fixture(scope="module")
def tok():
  return DualTokenizer.load(A.tokenizer_dir())


@pytest.fixture(scope="module")
def mllm():
  return UnifiedModel.from_checkpoint(A.mllm_dir())


@pytest.fixture(scope="module")
def photo(tok):
  return load_image(T.photos()[PHOTO], tok.config.image_size)


# ------------------------------------------------------------------ library pieces
def test_decode_levels_equals_decoding_the_first_k_levels(tok, photo):
  codes = np.asarray(tok.encode(photo[None]).pixel)
  depth = tok.config.vq_pix.depth
  codebook, _ = tok.model.apply(tok.variables, method=DualToken.codebooks)
  codebook = np.asarray(codebook)
  decode = jax.jit(lambda v, z: tok.model.apply(v, z, method=DualToken.decode))
  decoded = []
  for k in range(1, depth + 1):
    z = sum(codebook[codes[..., d]] for d in range(k))  # the first k levels' embeddings, by hand
    expected = decode(tok.variables, z.reshape(1, -1, z.shape[-1]))
    got = np.asarray(tok.decode_levels(codes, k))
    np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"k={k}")
    decoded.append(got[0])
  np.testing.assert_allclose(decoded[-1], tok.decode(codes)[0], atol=1e-5)  # all D = decode
  assert all(np.abs(a - b).max() > 1e-3 for a, b in zip(decoded, decoded[1:]))  # levels matter
  per_image = np.asarray(tok.decode_levels(np.repeat(codes, depth, 0), np.arange(1, depth + 1)))
  np.testing.assert_allclose(per_image, np.stack(decoded), atol=1e-5)
  for bad in (0, depth + 1, [1, 2]):
    with pytest.raises(ValueError, match="levels"):
      tok.decode_levels(codes, bad)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  spm = T.train_spm(tmp_path_factory.mktemp("app_spm") / "t.model", T.corpus())
  return sequence.Vocabulary.load(spm, C.DEFAULT_SPECIAL_TOKENS)


@pytest.mark.parametrize("attention", ["causal", "prefix_lm"])
def test_multi_turn_prompt_is_the_training_layout_up_to_the_answer(vocab, attention):
  layout = sequence.Layout.from_config(config_files.load(f"mllm_tiny:attention={attention}"))
  turns = [("<image>\nWhat is in this picture?", "a cat"), ("Describe the image.", "a cup of coffee")]
  conversation = [{"from": r, "value": v} for q, a in turns for r, v in (("human", q), ("gpt", a))]
  example = sequence.build_example(vocab, layout, conversation, has_image=True)
  prompt = sequence.build_prompt(vocab, layout, turns[1][0], True, history=turns[:1])
  n = len(prompt["tokens"])
  np.testing.assert_array_equal(prompt["tokens"], example["tokens"][:n])
  np.testing.assert_array_equal(prompt["image_mask"], example["image_mask"][:n])
  np.testing.assert_array_equal(prompt["mask_ar"], example["mask_ar"][:n])
  assert example["loss_mask"][n] and not example["loss_mask"][n - 1]  # the answer starts here
  assert prompt["image_mask"].sum() == layout.num_image_positions  # the image only once
  single = sequence.build_prompt(vocab, layout, "What do you see?", True)
  expected_ar = 0 if attention == "prefix_lm" else 1  # a first turn is all prefix
  assert set(single["mask_ar"].tolist()) == {expected_ar}


def test_streamed_answer_is_the_answer_token_by_token(mllm):
  # seeded sampling in a second turn (the browser chat test streams a greedy first turn)
  ask = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3,
             history=[("What is in this picture?", "a cat")])
  ids = mllm.generate_ids("What do you see?", T.photos()[PHOTO], **ask)
  steps = list(mllm.stream_answer("What do you see?", T.photos()[PHOTO], **ask))
  assert len(ids) > 1 and steps == [mllm.vocab.decode(ids[:i + 1]).strip()
                                    for i in range(len(ids))]
  assert steps[-1] == mllm.answer("What do you see?", T.photos()[PHOTO], **ask)


# ------------------------------------------------------------------ app pieces
class _Cells(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.cells = []

  def handle_starttag(self, tag, attrs):
    if tag == "td":
      self.cells.append(dict(attrs))


def test_code_maps_show_every_code_id_on_hover():
  codes = np.array([[[5, 9], [5, 200]], [[0, 9], [255, 1]]])  # (h=2, w=2, D=2)
  parser = _Cells()
  parser.feed(tokenizer_tab.code_maps_html(codes, "pixel"))
  assert len(parser.cells) == 8
  level2 = parser.cells[4:]  # the grids are level by level, rows in raster order
  assert [int(c["data-code"]) for c in level2] == [9, 200, 9, 1]
  assert level2[1]["title"] == "pixel level 2, row 0, col 1: code 200 (levels 1..2: 5, 200)"
  colour = {int(c["data-code"]): c["style"] for c in parser.cells}
  assert colour[9] == f"background:{tokenizer_tab.code_colour(9)}" and colour[5] != colour[9]
  assert len({tokenizer_tab.code_colour(k) for k in range(256)}) == 256


def test_code_budget_of_the_tiny_tokenizer(tok):
  # 32 px / patch 8 = 4x4 cells; D = 4 per branch; K = 256 = 8 bits per code
  assert tokenizer_tab.code_budget(tok.config) == dict(
      pixel_tokens=64, pixel_bits=512.0, semantic_tokens=64, semantic_bits=512.0, tokens=128,
      bits=1024.0)


def test_analysis_matches_the_tokenizer_and_the_host_psnr(tok, photo):
  a = tokenizer_tab.analyse(tok, photo)
  np.testing.assert_allclose(a.reconstruction, tok.reconstruct(photo[None])[0], atol=1e-4)
  host = [image_utils.psnr(image_utils.to_unit(photo), image_utils.to_unit(x), data_range=1.0)
          for x in a.levels]
  np.testing.assert_allclose(a.psnr, host, atol=1e-3)
  assert 0.0 < a.ssim <= 1.0 and a.levels.shape[0] == tok.config.vq_pix.depth


def test_downloaded_codes_are_the_tokenize_cli_npz(tok, photo, tmp_path):
  a = tokenizer_tab.analyse(tok, photo)
  ours = np.load(tokenizer_tab.write_codes(a, "chelsea.png"))
  with contextlib.redirect_stdout(io.StringIO()):
    assert tokenize.main(["--checkpoint", A.tokenizer_dir(), T.photos()[PHOTO],
                          "--output", str(tmp_path / "cli.npz")]) == 0
  cli = np.load(tmp_path / "cli.npz")
  assert sorted(ours.files) == sorted(cli.files) == ["keys", "pixel", "semantic"]
  assert ours["keys"].tolist() == ["chelsea.png"]
  for name in ("pixel", "semantic"):
    assert ours[name].dtype == cli[name].dtype == np.int32
    np.testing.assert_array_equal(ours[name], cli[name])


def test_a_file_that_is_not_an_image_gets_a_message(tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("not an image")
  with pytest.raises(gr.Error, match="notes.txt could not be used as an image"):
    inputs.read_image(str(text), 32)
  with pytest.raises(gr.Error, match="Upload an image first"):
    inputs.read_image(None, 32)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.new("1", (9000, 8000)).save(tmp_path / "huge.png")  # 72 M pixels, a small file
  with pytest.raises(gr.Error, match="huge.png could not be used as an image: .*pixels"):
    inputs.read_image(str(tmp_path / "huge.png"), 32)


def test_missing_defaults_and_wrong_checkpoints_are_explained(tmp_path, monkeypatch):
  parser = argparse.ArgumentParser()
  models.add_flags(parser)
  monkeypatch.chdir(tmp_path)  # no workdirs/ here
  missing = models.load_tokenizer(parser.parse_args([]))
  assert missing.model is None and models.TOKENIZER_COMMAND in missing.problem
  assert "random tokenizer is no default" in missing.problem
  assert models.MLLM_COMMAND in models.load_mllm(None).problem
  wrong = models.load_mllm(A.tokenizer_dir())  # a tokenizer is not a unified model
  assert wrong.model is None and wrong.problem.startswith(
      f"Could not load the unified model from `{A.tokenizer_dir()}`")
  loaded = models.load_tokenizer(parser.parse_args(["--tokenizer", A.tokenizer_dir()]))
  assert loaded.problem is None and loaded.model.config.image_size == 32


def test_option_mappings_follow_the_clis():
  assert generate_tab.generation_options(0, 1.0, 0, 0.96, 4) == dict(
      cfg_scale=None, temperature=1.0, top_k=None, top_p=0.96, seed=4)
  assert generate_tab.generation_options(3, 0.5, 900, 1.0, None)["cfg_scale"] == 3.0
  assert chat_tab.sampling_options(0, 1.0) == dict(temperature=0.0, top_p=None)
  assert chat_tab.messages([("q", "")])[1]["content"] == chat_tab.EMPTY_ANSWER


# ------------------------------------------------------------------ in a real browser
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
  import os  # pylint: disable=g-import-not-at-top
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium)")
  sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
  with sync_api.sync_playwright() as p:
    b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    yield b
    b.close()


@pytest.fixture(scope="module")
def app(browser, tok, mllm):
  """The app served on a free local port against the tiny checkpoints: (url, requests seen)."""
  from dualtoken_jax.app import page  # pylint: disable=g-import-not-at-top
  import portpicker  # pylint: disable=g-import-not-at-top
  blocks = page.build(models.Loaded(tok, A.tokenizer_dir()), models.Loaded(mllm, A.mllm_dir()))
  port = portpicker.pick_unused_port()
  page.launch(blocks, port, block=False)
  yield f"http://127.0.0.1:{port}"
  blocks.close()


@pytest.fixture(scope="module")
def tab(browser, app):
  """One browser page on the app, with every request it makes recorded."""
  context = browser.new_context(viewport={"width": 1280, "height": 1000})
  p = context.new_page()
  p.set_default_timeout(TIMEOUT_MS)
  p.requests = []
  p.on("request", lambda r: p.requests.append(r.url))
  p.goto(app)
  yield p
  context.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
  import os  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  root = os.environ.get("DUALTOKEN_APP_SCREENSHOTS")
  path = pathlib.Path(root) if root else tmp_path_factory.mktemp("app_screenshots")
  path.mkdir(parents=True, exist_ok=True)
  print(f"app screenshots: {path}")
  return path


def _open(tab_page, name):
  tab_page.get_by_role("tab", name=name).click()


def test_browser_tokenizer_tab_reconstructs_an_uploaded_photo(tab, tok, photo, screenshots):
  tab.locator("#tokenizer-upload input[type=file]").set_input_files(T.photos()[PHOTO])
  metrics = tab.locator("#tokenizer-metrics")
  metrics.get_by_text("PSNR").wait_for()
  expected = tokenizer_tab.analyse(tok, photo)
  assert f"PSNR {expected.psnr[-1]:.2f} dB" in metrics.inner_text()
  assert f"SSIM {expected.ssim:.3f}" in metrics.inner_text()
  assert "128 tokens per image" in metrics.inner_text() and "1024 bits" in metrics.inner_text()
  depth, g = tok.config.vq_pix.depth, tok.grid
  cells = tab.locator("#tokenizer-code-maps td[title]")
  cells.first.wait_for()
  assert cells.count() == 2 * depth * g * g
  first = tab.locator('#tokenizer-code-maps table[data-branch="pixel"][data-level="1"] td').first
  assert first.get_attribute("title").endswith(
      f"code {int(expected.pixel[0, 0, 0])} (levels 1..{depth}: "
      f"{', '.join(str(int(x)) for x in expected.pixel[0, 0])})")
  tab.locator("#tokenizer-levels img").nth(depth - 1).wait_for()
  assert tab.locator("#tokenizer-reconstruction img").count() == 1
  tab.screenshot(path=str(screenshots / "tokenizer.png"), full_page=True)
  link = tab.locator("#tokenizer-download a[href]").first
  codes = np.load(io.BytesIO(tab.request.get(link.get_attribute("href")).body()))
  np.testing.assert_array_equal(codes["pixel"][0], expected.pixel)
  np.testing.assert_array_equal(codes["semantic"][0], expected.semantic)


def test_browser_files_that_are_not_images_get_a_message(tab, tmp_path):
  _open(tab, "Tokenizer")
  upload = tab.locator("#tokenizer-upload input[type=file]")
  for name in ("notes.txt", "notes.png"):  # refused by Gradio's page / by load_image
    (tmp_path / name).write_text("this is not an image")
  upload.set_input_files(str(tmp_path / "notes.txt"))
  tab.get_by_text("Invalid file type: notes.txt").first.wait_for()
  upload.set_input_files(str(tmp_path / "notes.png"))
  tab.get_by_text("notes.png could not be used as an image").first.wait_for()


def test_browser_chat_tab_answers_a_question(tab, mllm, screenshots):
  _open(tab, "Chat")
  tab.locator("#chat-image input[type=file]").set_input_files(T.photos()[PHOTO])
  tab.locator("#chat-image img").first.wait_for()
  expected = mllm.answer("What is in this picture?", T.photos()[PHOTO], max_new_tokens=64)
  tab.locator("#chat-question textarea").fill("What is in this picture?")
  tab.locator("#chat-send").click()
  bot = tab.locator("#chat-log .message.bot, #chat-log [data-testid=bot]").last
  want = expected or chat_tab.EMPTY_ANSWER
  tab.wait_for_function("([sel, want]) => [...document.querySelectorAll(sel)].some("
                        "e => e.innerText.trim() === want)",
                        arg=["#chat-log [data-testid=bot]", want])
  assert bot.inner_text().strip() == want and want
  tab.screenshot(path=str(screenshots / "chat.png"), full_page=True)


def test_browser_generate_tab_matches_the_generate_cli(tab, tmp_path, screenshots):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from dualtoken_jax import generate  # pylint: disable=g-import-not-at-top
  _open(tab, "Generate")
  tab.locator("#generate-prompt textarea").fill("a photo of a cat")
  tab.locator("#generate-seed input").fill("7")
  tab.locator("#generate-button").click()
  tab.locator("#generate-status").get_by_text("seed 7").wait_for()
  src = tab.locator("#generate-gallery img").first.get_attribute("src")
  served = np.asarray(Image.open(io.BytesIO(tab.request.get(src).body())).convert("RGB"))
  with contextlib.redirect_stdout(io.StringIO()):
    assert generate.main(["--checkpoint", A.mllm_dir(), "--prompt", "a photo of a cat",
                          "--out", str(tmp_path / "cli.png"), "--seed", "7"]) == 0
  np.testing.assert_array_equal(served, np.asarray(Image.open(tmp_path / "cli.png")))
  tab.screenshot(path=str(screenshots / "generate.png"), full_page=True)


def test_browser_the_page_requests_nothing_but_the_local_server(tab, app):
  local = [u for u in tab.requests if u.startswith((app, "data:", "blob:"))]
  assert tab.requests and local == tab.requests, sorted(set(tab.requests) - set(local))
