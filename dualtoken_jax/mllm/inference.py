"""Inference with a trained MLLM: answer a prompt about an image, or generate images.

    model = UnifiedModel.from_checkpoint("workdirs/mllm")      # a train_mllm workdir or step dir
    model.answer("What is in this picture?", image="cat.jpg", temperature=0.7, top_p=0.9)
    out = model.generate_images("a photo of a cat", n=4, cfg_scale=3.0, seed=0)
    model.llm().export_hf("gemma_out")                      # the decoder alone, HF format

The prompt is laid out exactly like a training user turn (`sequence.build_prompt`), embedded
with the image's visual vectors at the image positions, prefilled into the decoder's cache
(prefix-LM prompts bidirectionally) and extended one token at a time by the jitted loop of
`llm.decoding.generate` (greedy, temperature, top-k, top-p; stops at the config's EOS ids).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dualtoken_jax.parallel import sharding
from dualtoken_jax.data.transforms import load_image
from dualtoken_jax.llm import DecoderLM
from dualtoken_jax.llm import decoding, masks, sampling
from dualtoken_jax.mllm import config as C
from dualtoken_jax.mllm import generation
from dualtoken_jax.mllm import model as M
from dualtoken_jax.mllm import projector as V
from dualtoken_jax.mllm import sequence
from dualtoken_jax.mllm import state as S
from dualtoken_jax.mllm import text_tokenizers
from dualtoken_jax.training import checkpoints
from dualtoken_jax.training import state as T

# The tokenizer copy train_mllm writes into the workdir, per kind (SentencePiece's name kept).
SPM_FILE = text_tokenizers.WORKDIR_FILES[text_tokenizers.SENTENCEPIECE]


class UnifiedModel:
  """An MLLM config, its params, the frozen tokenizer's variables and the vocabulary."""

  def __init__(self, config, params, tokenizer_variables, vocab: sequence.Vocabulary):
    vocab.check_llm(config.model.llm)
    self.config = config
    self.params = params
    self.tokenizer_variables = tokenizer_variables
    self.vocab = vocab
    self.layout = sequence.Layout.from_config(config)
    self.model = M.DualTokenMLLM(M.frozen_model_config(config.model))
    self.decoder = M.llm_module(config.model)
    self.tokenizer = M.tokenizer_module(config.model)

  @classmethod
  def from_checkpoint(cls, path: str | Path, spm_model: str | Path | None = None,
                      mesh=None, *, tokenizer: str | Path | None = None) -> "UnifiedModel":
    """The newest checkpoint of a train_mllm workdir (or one step directory). Only params and
    tokenizer are read (not the optimiser state). The text tokenizer (a SentencePiece model or
    a HF tokenizer.json) is `tokenizer` (`spm_model`, its older name), else the run's copy in
    the workdir, else the path in the config."""
    step_dir, config = checkpoints.read_run(path, "mllm")
    config = C.from_dict(config)
    mesh = mesh or sharding.single_device_mesh()
    restored = S.restore_weights(step_dir, T.state_layout(S.Modules(config), mesh))
    workdir_copy = text_tokenizers.workdir_file(step_dir.parent.parent)
    text_file = tokenizer or spm_model or workdir_copy or C.tokenizer_path(config.text)
    vocab = sequence.Vocabulary.load(text_file, config.model.special_tokens,
                                     C.template_pieces(config.text.template))
    return cls(config, restored["params"], restored["tokenizer"], vocab)

  def llm(self) -> DecoderLM:
    """The decoder part as a `DecoderLM` (for `export_hf` / `export_orbax` / text generation)."""
    return DecoderLM(self.config.model.llm, self.params["llm"])

  def answer(self, prompt: str, image=None, *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0) -> str:
    """The model's answer to `prompt` about `image` (a file path, or an array (H, W, 3) in
    [-1, 1] at the tokenizer's image size; None for text only)."""
    ids = self.generate_ids(prompt, image, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return self.vocab.decode(ids).strip()

  def generate_ids(self, prompt: str, image=None, *, max_new_tokens: int = 32,
                   temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, seed: int = 0) -> list[int]:
    """The generated token ids, up to (not including) the first end-of-sequence id."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    temperature, top_k, top_p = sampling.check_options(temperature, top_k, top_p)
    p = sequence.build_prompt(self.vocab, self.layout, prompt, has_image=image is not None)
    images = None if image is None else jnp.asarray(self._image(image))[None]
    tokens = jnp.asarray(p["tokens"])[None]
    image_mask = jnp.asarray(p["image_mask"])[None]
    prompt_mask = jnp.ones(tokens.shape, bool)
    attn = masks.make_attn_mask(prompt_mask, jnp.asarray(p["mask_ar"])[None])
    x = _embed(self.model, self.tokenizer, self.config.model.visual_vector, self.params,
               self.tokenizer_variables, tokens, image_mask, images)
    eos = tuple(sorted(set(self.config.model.llm.eos_ids) | {self.vocab.eos_id}))
    out = decoding.generate(
        self.decoder, self.params["llm"], tokens, prompt_mask, jax.random.key(seed),
        max_new_tokens=int(max_new_tokens), temperature=jnp.float32(temperature),
        top_k=jnp.int32(top_k), top_p=jnp.float32(top_p), eos_ids=jnp.asarray(eos, jnp.int32),
        pad_id=jnp.int32(self.vocab.pad_id), prompt_embeddings=x, prompt_attn_mask=attn)
    new = [int(t) for t in np.asarray(out)[0, tokens.shape[1]:]]
    stop = next((i for i, t in enumerate(new) if t in eos), len(new))
    return new[:stop]

  def generate_images(self, caption: str, n: int = 1, *, cfg_scale: float | None = 3.0,
                      temperature: float = 1.0, top_k: int | None = 900,
                      top_p: float | None = 0.96, seed: int = 0) -> dict[str, np.ndarray]:
    """`n` images for `caption` (spec D.3 defaults: CFG 3, temperature 1, top-k 900, top-p
    0.96; `cfg_scale=None` samples without the unconditional half). Returns {"images" (n, H,
    W, 3) in [-1, 1], "codes_pixel", "codes_semantic" (n, g, g, D)}; the same seed gives the
    same images."""
    if n < 1:
      raise ValueError(f"n must be >= 1, got {n}")
    temperature, top_k, top_p = sampling.check_options(temperature, top_k, top_p)
    guided = cfg_scale is not None
    prompts = [caption] * n + ([""] * n if guided else [])
    built = [sequence.build_generation_prompt(self.vocab, self.layout, c) for c in prompts]
    length = max(len(p["tokens"]) for p in built)
    tokens = np.full((len(built), length), self.vocab.pad_id, np.int32)
    mask = np.zeros((len(built), length), bool)
    mask_ar = np.ones((len(built), length), np.int32)
    for i, p in enumerate(built):
      k = len(p["tokens"])
      tokens[i, :k], mask[i, :k], mask_ar[i, :k] = p["tokens"], True, p["mask_ar"]
    pix, sem = generation.sample_codes(
        self.model, self.decoder, self.tokenizer, self.params, self.tokenizer_variables,
        jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(mask_ar), jax.random.key(seed),
        guided=guided, cfg_scale=jnp.float32(cfg_scale or 1.0),
        temperature=jnp.float32(temperature), top_k=jnp.int32(top_k), top_p=jnp.float32(top_p))
    images = generation.decode_pixels(self.tokenizer, self.tokenizer_variables, pix)
    return {"images": np.asarray(images), "codes_pixel": np.asarray(pix),
            "codes_semantic": np.asarray(sem)}

  def _image(self, image) -> np.ndarray:
    size = self.config.model.tokenizer.image_size
    if isinstance(image, (str, Path)):
      return load_image(Path(image), size)
    image = np.asarray(image, np.float32)
    if image.shape != (size, size, 3):
      raise ValueError(f"image arrays must be ({size}, {size}, 3) in [-1, 1]; got {image.shape}"
                       " (pass a file path to resize and centre-crop it)")
    return image


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _embed(model, tokenizer, visual_vector, params, tokenizer_variables, tokens, image_mask,
           images):
  """Prompt embeddings (B, P, D): tokens embedded, image positions from the images' codes."""
  visual = None
  if images is not None:
    pix, sem = V.encode_codes(tokenizer, tokenizer_variables, images)
    visual = V.visual_vectors(tokenizer, tokenizer_variables, pix, sem, visual_vector)
  return model.apply({"params": params}, tokens, image_mask, visual,
                     method=M.DualTokenMLLM.embed)
