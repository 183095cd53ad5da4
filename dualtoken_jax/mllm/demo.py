"""The MLLM demo (`configs/demo_mllm_cpu.py`): a tiny unified model learns both directions on
the photos bundled with scikit-image / scikit-learn / matplotlib, then measures itself.

`prepare` writes the data set into `WORKDIR/demo_data/` (once; a resumed run reuses it): a
SentencePiece model trained on the demo's texts, LLaVA conversations asking what each photo
shows (four phrasings), caption-image pairs ("a photo of a cat", "draw a cat") and a held-out
question phrasing for evaluation. `report` (after the last step) asks the held-out question
about every photo (understanding: the greedy answer must be the photo's name) and generates
one image per caption "a photo of ..." with the default sampling (CFG 3, temperature 1, top-k
900, top-p 0.96); a generation counts as right when its codes are nearest, in the tokenizer's
code-embedding space, to the captioned photo's codes among all photos. It writes
`WORKDIR/demo_report.json` (`understanding_accuracy`, `generation_accuracy`, `chance`) and
`WORKDIR/demo_generations.png` (caption | generated image | the captioned photo decoded from
its own codes | nearest photo), and the mean PSNR between the generated image and that
decoding (how exactly the model reproduces the memorised codes).

The model memorises ten photos: this shows that every part of the pipeline learns, not that
the model generalises.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import jax
import numpy as np
import sentencepiece as spm
from PIL import Image, ImageDraw

from dualtoken_jax.data import load_image, sample_photos
from dualtoken_jax.mllm import generation
from dualtoken_jax.mllm import projector as V
from dualtoken_jax.data.images import psnr, to_uint8

# What each bundled photo shows; the understanding task names it, the captions draw it.
ANSWERS = {
    "skimage/astronaut.png": "an astronaut",
    "skimage/chelsea.png": "a cat",
    "skimage/coffee.png": "a cup of coffee",
    "skimage/rocket.jpg": "a rocket",
    "skimage/camera.png": "a cameraman",
    "skimage/motorcycle_left.png": "a motorcycle",
    "skimage/hubble_deep_field.jpg": "galaxies in space",
    "sklearn/china.jpg": "a temple",
    "sklearn/flower.jpg": "a flower",
    "matplotlib/grace_hopper.jpg": "a woman in uniform",
}
TRAIN_QUESTIONS = ("What is in this picture?", "What do you see?", "Describe the image.",
                   "Name what is shown here.")
HELD_OUT_QUESTION = "What does this image show?"
CAPTION_TEMPLATES = ("a photo of {}", "draw {}")
REPORT_CAPTION = CAPTION_TEMPLATES[0]


def photos() -> dict[str, str]:
  """{key: path} of the bundled photos that have an answer (all of them when installed)."""
  return {k: p for k, p in sample_photos.sample_photo_paths().items() if k in ANSWERS}


def conversation(image: str | None, question: str, answer: str, marker: bool = True) -> dict:
  item = {"conversations": [{"from": "human", "value": ("<image>\n" if marker else "") + question},
                            {"from": "gpt", "value": answer}]}
  if image is not None:
    item["image"] = image
  return item


def photo_conversations(questions) -> list[dict]:
  return [conversation(path, q, ANSWERS[key]) for key, path in photos().items() for q in questions]


def photo_captions() -> list[dict]:
  return [{"image": path, "caption": t.format(ANSWERS[key])}
          for key, path in photos().items() for t in CAPTION_TEMPLATES]


def corpus() -> list[str]:
  """Every demo text: questions, answers, captions and the turn template's newline."""
  captions = [c["caption"] for c in photo_captions()]
  return [f"{q}\n" for q in TRAIN_QUESTIONS] + list(ANSWERS.values()) * 3 + captions


def train_spm(path: Path, texts, vocab_size: int = 120) -> Path:
  """A small BPE SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3),
  keeping newlines as a piece, as Gemma's tokenizer does."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      hard_vocab_limit=False, minloglevel=2, normalization_rule_name="identity",
      remove_extra_whitespaces=False, user_defined_symbols=["\n"])
  path.write_bytes(model.getvalue())
  return path


def _write_json(path: Path, items) -> str:
  path.write_text(json.dumps(list(items), indent=1))
  return str(path)


def prepare(config, workdir: Path) -> None:
  """Writes the demo data under `workdir/demo_data` (if absent) and points `config` at it."""
  root = Path(workdir) / "demo_data"
  if len(photos()) < 2:
    raise RuntimeError("the MLLM demo needs the photos bundled with scikit-image, scikit-learn "
                       "and matplotlib (pip install -r requirements.txt)")
  if not (root / "captions.json").is_file():
    root.mkdir(parents=True, exist_ok=True)
    train_spm(root / "sentencepiece.model", corpus())
    _write_json(root / "conversations.json", photo_conversations(TRAIN_QUESTIONS))
    _write_json(root / "held_out.json", photo_conversations([HELD_OUT_QUESTION]))
    _write_json(root / "captions.json", photo_captions())  # last: marks the data complete
  config.text.spm_model = str(root / "sentencepiece.model")
  config.data.train = str(root / "conversations.json")
  config.data.captions = str(root / "captions.json")
  config.eval.data = str(root / "held_out.json")


def report(config, state, vocab, workdir: Path) -> dict:
  """Measures both directions with the final state; writes the JSON report and the PNG."""
  from dualtoken_jax.mllm.inference import UnifiedModel  # pylint: disable=g-import-not-at-top
  model = UnifiedModel(config, state.params, state.tokenizer, vocab)
  keys = list(photos())
  paths = [photos()[k] for k in keys]
  understood = [model.answer(HELD_OUT_QUESTION, p, max_new_tokens=12) == ANSWERS[k]
                for k, p in zip(keys, paths)]
  size = config.model.tokenizer.image_size
  images = np.stack([load_image(p, size) for p in paths])
  codes = V.encode_codes(model.tokenizer, model.tokenizer_variables, images)
  photo_vectors = _code_vectors(model, *codes)
  reconstructions = np.asarray(generation.decode_pixels(model.tokenizer,
                                                        model.tokenizer_variables, codes[0]))
  rows, generated, psnrs = [], [], []
  for i, key in enumerate(keys):
    out = model.generate_images(REPORT_CAPTION.format(ANSWERS[key]), seed=i)
    vector = _code_vectors(model, out["codes_pixel"], out["codes_semantic"])[0]
    nearest = int(np.argmin(((photo_vectors - vector) ** 2).sum(axis=1)))
    generated.append(nearest == i)
    psnrs.append(psnr(out["images"][0], reconstructions[i], data_range=2.0))
    rows.append((REPORT_CAPTION.format(ANSWERS[key]), out["images"][0], reconstructions[i],
                 images[nearest], keys[nearest]))
  result = {"understanding_accuracy": float(np.mean(understood)),
            "generation_accuracy": float(np.mean(generated)),
            "chance": 1.0 / len(keys), "photos": len(keys),
            "psnr_generated_vs_photo_codes_db": float(np.mean(psnrs)),
            "understanding_correct": dict(zip(keys, map(bool, understood))),
            "generation_correct": dict(zip(keys, map(bool, generated))),
            "measure": "generation: nearest photo by L2 distance of the dual-token code "
                       "embeddings (pixel + semantic, summed over depth, all positions)"}
  (Path(workdir) / "demo_report.json").write_text(json.dumps(result, indent=2))
  _sheet(rows).save(Path(workdir) / "demo_generations.png")
  logging.info("demo report: understanding %.2f, generation %.2f (chance %.2f)",
               result["understanding_accuracy"], result["generation_accuracy"], result["chance"])
  return result


def _code_vectors(model, codes_pix, codes_sem) -> np.ndarray:
  """(B, N * C) flattened dual-token code embeddings (the MLLM's visual input space)."""
  vectors = V.visual_vectors(model.tokenizer, model.tokenizer_variables, codes_pix, codes_sem,
                             "code_embeddings")
  return np.asarray(jax.device_get(vectors)).reshape(len(codes_pix), -1)


def _sheet(rows, scale: int = 2) -> Image.Image:
  """caption | generated | the captioned photo decoded from its own codes | nearest photo."""
  to_pil = lambda x: Image.fromarray(to_uint8(x)).resize(
      (x.shape[1] * scale, x.shape[0] * scale), Image.NEAREST)
  side = rows[0][1].shape[0] * scale
  text_w, pad = 200, 4
  sheet = Image.new("RGB", (text_w + 3 * (side + pad) + pad, len(rows) * (side + pad) + pad),
                    "white")
  draw = ImageDraw.Draw(sheet)
  for r, (caption, image, own_codes, nearest, key) in enumerate(rows):
    y = pad + r * (side + pad)
    draw.text((pad, y + side // 3), caption, fill="black")
    draw.text((pad, y + side // 3 + 14), f"nearest: {key.split('/')[-1]}", fill="gray")
    for c, picture in enumerate((image, own_codes, nearest)):
      sheet.paste(to_pil(picture), (text_w + c * (side + pad), y))
  return sheet

