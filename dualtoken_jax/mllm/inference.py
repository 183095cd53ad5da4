"""Inference with a trained MLLM: answer a prompt about an image, or generate images.

    model = UnifiedModel.from_checkpoint("workdirs/mllm")      # a train_mllm workdir or step dir
    model.answer("What is in this picture?", image="cat.jpg", temperature=0.7, top_p=0.9)
    for text in model.stream_answer("And its colour?", "cat.jpg", history=[(q, a)]): ...
    out = model.generate_images("a photo of a cat", n=4, cfg_scale=3.0, seed=0)
    model.llm().export_hf("gemma_out")                      # the decoder alone, HF format

The prompt is laid out exactly like a training user turn (`sequence.build_prompt`), embedded
with the image's visual vectors at the image positions, prefilled into the decoder's cache
(prefix-LM prompts bidirectionally) and extended one token at a time by the jitted loop of
`llm.decoding.generate` (greedy, temperature, top-k, top-p; stops at the config's EOS ids);
`stream_answer` steps the same loop from Python (`llm.decoding.stream`) and yields the answer
so far after every token. Earlier turns of a multi-turn chat go in `history`, laid out as in a
multi-turn training conversation.

Benchmarks (`mllm_eval`) use the batched forms: `answer_batch` right-pads several prompts into
one `decoding.generate` call (the same inputs `answer` builds, per row; padded to a length
bucket and a fixed batch so one compilation serves a whole run, the batch axis sharded over a
mesh's data axes), and `loglikelihood` / `loglikelihood_batch` score a continuation (an
option text) teacher-forced after the prompt, as lmms-eval's `loglikelihood` does.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator, Sequence

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
             seed: int = 0, history: Sequence[tuple[str, str]] = ()) -> str:
    """The model's answer to `prompt` about `image` (a file path, or an array (H, W, 3) in
    [-1, 1] at the tokenizer's image size; None for text only). `history`: the earlier
    (question, answer) turns of a multi-turn chat (the image belongs to the first question)."""
    ids = self.generate_ids(prompt, image, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            history=history)
    return self.vocab.decode(ids).strip()

  def answer_batch(self, prompts: Sequence[str], images: Sequence | None = None, *,
                   max_new_tokens: int = 32, batch_size: int | None = None,
                   length_bucket: int = 32, mesh=None) -> list[str]:
    """Greedy answers to several prompts at once (one `decoding.generate` call): the answer
    `answer(prompt, image)` gives for each. `images[i]` is as in `answer` (None: text only).
    The batch is padded to `batch_size` rows (default: as given) and the prompts to a multiple
    of `length_bucket` tokens, so equal shapes reuse one compilation; with a `mesh` the batch
    axis is split over its data axes (`batch_size` must then be a multiple of their size)."""
    images = [None] * len(prompts) if images is None else list(images)
    if len(images) != len(prompts):
      raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    if not prompts:
      return []
    inputs = self._batch_inputs(list(prompts), images, [()] * len(prompts), max_new_tokens,
                                0.0, None, None, 0, batch_size=batch_size,
                                length_bucket=length_bucket, mesh=mesh)
    out = np.asarray(decoding.generate(self.decoder, self.params["llm"], **inputs))
    eos = set(np.asarray(inputs["eos_ids"]).tolist())
    answers = []
    for row in out[:len(prompts), inputs["prompt"].shape[1]:]:
      new = [int(t) for t in row]
      stop = next((i for i, t in enumerate(new) if t in eos), len(new))
      answers.append(self.vocab.decode(new[:stop]).strip())
    return answers

  def loglikelihood(self, prompt: str, image, continuation: str) -> float:
    """log p(continuation | prompt, image): the summed log-probabilities of the continuation's
    tokens (the model turn's text, without its end), teacher-forced after the prompt."""
    return self.loglikelihood_batch([(prompt, image, continuation)])[0][0]

  def loglikelihood_batch(self, requests: Sequence[tuple], *, batch_size: int | None = None,
                          length_bucket: int = 32, mesh=None) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each (prompt, image, continuation) request in one
    teacher-forced pass (lmms-eval's `loglikelihood`); is_greedy: every continuation token is
    the argmax. Padding as in `answer_batch`."""
    if not requests:
      return []
    before = self.layout.template_model.partition("{text}")[0]
    rows = []
    for prompt, image, continuation in requests:
      p = sequence.build_prompt(self.vocab, self.layout, prompt, has_image=image is not None)
      cont = np.asarray(self.vocab.encode(before + continuation), np.int32)
      if not len(cont):
        raise ValueError(f"the continuation {continuation!r} has no tokens")
      k = len(cont)
      rows.append(dict(tokens=np.concatenate([p["tokens"], cont]),
                       image_mask=np.concatenate([p["image_mask"], np.zeros(k, bool)]),
                       mask_ar=np.concatenate([p["mask_ar"], np.ones(k, np.int32)]),
                       target=np.concatenate([np.zeros(len(p["tokens"]), bool),
                                              np.ones(k, bool)])))
    batch = self._pad_rows(rows, [image for _, image, _ in requests], batch_size, length_bucket,
                           extra=("target",))
    batch = _shard_batch(batch, mesh)
    logprob, greedy = _continuation_scores(
        self.model, self.tokenizer, self.config.model.visual_vector, self.params,
        self.tokenizer_variables, batch["tokens"], batch["image_mask"], batch["input_mask"],
        batch["mask_ar"], batch["target"], batch["images"])
    logprob, greedy = np.asarray(logprob), np.asarray(greedy)
    return [(float(logprob[i]), bool(greedy[i])) for i in range(len(requests))]

  def generate_ids(self, prompt: str, image=None, *, max_new_tokens: int = 32,
                   temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, seed: int = 0,
                   history: Sequence[tuple[str, str]] = ()) -> list[int]:
    """The generated token ids, up to (not including) the first end-of-sequence id."""
    inputs = self._chat_inputs(prompt, image, max_new_tokens, temperature, top_k, top_p, seed,
                               history)
    out = decoding.generate(self.decoder, self.params["llm"], **inputs)
    new = [int(t) for t in np.asarray(out)[0, inputs["prompt"].shape[1]:]]
    eos = set(np.asarray(inputs["eos_ids"]).tolist())
    stop = next((i for i, t in enumerate(new) if t in eos), len(new))
    return new[:stop]

  def stream_answer(self, prompt: str, image=None, *, max_new_tokens: int = 32,
                    temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int = 0,
                    history: Sequence[tuple[str, str]] = ()) -> Iterator[str]:
    """`answer` while it is written: yields the answer so far after every new token (the
    last one is `answer`'s text for the same arguments; `llm.decoding.stream`)."""
    inputs = self._chat_inputs(prompt, image, max_new_tokens, temperature, top_k, top_p, seed,
                               history)
    eos = set(np.asarray(inputs["eos_ids"]).tolist())
    ids = []
    for token in decoding.stream(self.decoder, self.params["llm"], **inputs):
      if int(token[0]) in eos:
        return
      ids.append(int(token[0]))
      yield self.vocab.decode(ids).strip()

  def _chat_inputs(self, prompt, image, max_new_tokens, temperature, top_k, top_p, seed,
                   history) -> dict:
    """The keyword arguments of `decoding.generate` / `stream` for one chat turn (unpadded)."""
    return self._batch_inputs([prompt], [image], [history], max_new_tokens, temperature, top_k,
                              top_p, seed)

  def _batch_inputs(self, prompts, images, histories, max_new_tokens, temperature, top_k,
                    top_p, seed, *, batch_size=None, length_bucket=None, mesh=None) -> dict:
    """The keyword arguments of `decoding.generate` / `stream` for chat turns: each prompt
    (`sequence.build_prompt`) right-padded, embedded with its image's visual vectors, its
    prefill mask (prefix-LM within each row's valid tokens), the checked sampling options and
    the EOS ids. One prompt without `batch_size` / `length_bucket` is not padded at all."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    temperature, top_k, top_p = sampling.check_options(temperature, top_k, top_p)
    rows = [sequence.build_prompt(self.vocab, self.layout, prompt, has_image=image is not None,
                                  history=history)
            for prompt, image, history in zip(prompts, images, histories)]
    batch = _shard_batch(self._pad_rows(rows, images, batch_size, length_bucket), mesh)
    prompt_mask = batch["input_mask"]
    attn = masks.make_attn_mask(prompt_mask, batch["mask_ar"])
    x = _embed(self.model, self.tokenizer, self.config.model.visual_vector, self.params,
               self.tokenizer_variables, batch["tokens"], batch["image_mask"], batch["images"])
    eos = tuple(sorted(set(self.config.model.llm.eos_ids) | {self.vocab.eos_id}))
    return dict(prompt=batch["tokens"], prompt_mask=prompt_mask, rng=jax.random.key(seed),
                max_new_tokens=int(max_new_tokens), temperature=jnp.float32(temperature),
                top_k=jnp.int32(top_k), top_p=jnp.float32(top_p),
                eos_ids=jnp.asarray(eos, jnp.int32), pad_id=jnp.int32(self.vocab.pad_id),
                prompt_embeddings=x, prompt_attn_mask=attn)

  def _pad_rows(self, rows, images, batch_size=None, length_bucket=None, extra=()) -> dict:
    """Host arrays of right-padded rows: tokens, image_mask, mask_ar, input_mask (+ `extra`
    boolean fields) and images (None when no row has one; zeros for rows without). Rows are
    added (copies of the first) up to `batch_size`, the length rounded up to `length_bucket`."""
    n = len(rows)
    b = max(n, batch_size or n)
    length = max(len(r["tokens"]) for r in rows)
    if length_bucket:
      length = -(-length // length_bucket) * length_bucket
    rows = rows + [rows[0]] * (b - n)
    out = {"tokens": np.full((b, length), self.vocab.pad_id, np.int32),
           "image_mask": np.zeros((b, length), bool), "mask_ar": np.ones((b, length), np.int32),
           "input_mask": np.zeros((b, length), bool)}
    out.update({name: np.zeros((b, length), bool) for name in extra})
    for i, r in enumerate(rows):
      k = len(r["tokens"])
      out["tokens"][i, :k], out["image_mask"][i, :k] = r["tokens"], r["image_mask"]
      out["mask_ar"][i, :k], out["input_mask"][i, :k] = r["mask_ar"], True
      for name in extra:
        out[name][i, :k] = r[name]
    loaded = [None if image is None else self._image(image) for image in images]
    out["images"] = None
    if any(x is not None for x in loaded):
      size = self.config.model.tokenizer.image_size
      blank = np.zeros((size, size, 3), np.float32)
      loaded = loaded + [loaded[0]] * (b - n)
      out["images"] = np.stack([blank if x is None else x for x in loaded])
    return out

  def generate_images(self, caption: str, n: int = 1, *, cfg_scale: float | None = 3.0,
                      temperature: float = 1.0, top_k: int | None = 900,
                      top_p: float | None = 0.96, seed: int = 0) -> dict[str, np.ndarray]:
    """`n` images for `caption` (spec D.3 defaults: CFG 3, temperature 1, top-k 900, top-p
    0.96; `cfg_scale=None` samples without the unconditional half). Returns {"images" (n, H,
    W, 3) in [-1, 1], "codes_pixel", "codes_semantic" (n, g, g, D)}; the same seed gives the
    same images."""
    if n < 1:
      raise ValueError(f"n must be >= 1, got {n}")
    return self.generate_images_batch([caption] * n, cfg_scale=cfg_scale,
                                      temperature=temperature, top_k=top_k, top_p=top_p,
                                      seed=seed)

  def generate_images_batch(self, captions: Sequence[str], *, cfg_scale: float | None = 3.0,
                            temperature: float = 1.0, top_k: int | None = 900,
                            top_p: float | None = 0.96, seed: int = 0,
                            stream: int | None = None, batch_size: int | None = None,
                            length_bucket: int | None = None, mesh=None
                            ) -> dict[str, np.ndarray]:
    """One image per caption (several captions in one `generation.sample_codes` call, the
    machinery of `generate_images`, which is this with `[caption] * n`). The rows are padded
    to `batch_size` (copies of the first caption) and the prompts to a multiple of
    `length_bucket` tokens, so equal shapes reuse one compilation; with a `mesh` the 2B rows
    ([conditional; unconditional]) are split over its data axes. The PRNG key is
    `key(seed)`, or `fold_in(key(seed), stream)` when `stream` is given (benchmarks: one
    stream per fixed batch, so a resumed run draws the same images). Returns the first
    len(captions) rows of {"images", "codes_pixel", "codes_semantic"} as `generate_images`."""
    captions = list(captions)
    if not captions:
      raise ValueError("generate_images_batch needs at least one caption")
    temperature, top_k, top_p = sampling.check_options(temperature, top_k, top_p)
    guided = cfg_scale is not None
    n = len(captions)
    captions = captions + [captions[0]] * (max(n, batch_size or n) - n)
    prompts = captions + ([""] * len(captions) if guided else [])
    built = [sequence.build_generation_prompt(self.vocab, self.layout, c) for c in prompts]
    length = max(len(p["tokens"]) for p in built)
    if length_bucket:
      length = -(-length // length_bucket) * length_bucket
    tokens = np.full((len(built), length), self.vocab.pad_id, np.int32)
    mask = np.zeros((len(built), length), bool)
    mask_ar = np.ones((len(built), length), np.int32)
    for i, p in enumerate(built):
      k = len(p["tokens"])
      tokens[i, :k], mask[i, :k], mask_ar[i, :k] = p["tokens"], True, p["mask_ar"]
    batch = _shard_batch({"tokens": tokens, "mask": mask, "mask_ar": mask_ar}, mesh)
    rng = jax.random.key(seed)
    if stream is not None:
      rng = jax.random.fold_in(rng, stream)
    pix, sem = generation.sample_codes(
        self.model, self.decoder, self.tokenizer, self.params, self.tokenizer_variables,
        batch["tokens"], batch["mask"], batch["mask_ar"], rng,
        guided=guided, cfg_scale=jnp.float32(cfg_scale or 1.0),
        temperature=jnp.float32(temperature), top_k=jnp.int32(top_k), top_p=jnp.float32(top_p))
    images = generation.decode_pixels(self.tokenizer, self.tokenizer_variables, pix)
    return {"images": np.asarray(images)[:n], "codes_pixel": np.asarray(pix)[:n],
            "codes_semantic": np.asarray(sem)[:n]}

  def _image(self, image) -> np.ndarray:
    size = self.config.model.tokenizer.image_size
    if isinstance(image, (str, Path)):
      return load_image(Path(image), size)
    if isinstance(image, bytes):
      return load_image(image, size)
    image = np.asarray(image, np.float32)
    if image.shape != (size, size, 3):
      raise ValueError(f"image arrays must be ({size}, {size}, 3) in [-1, 1]; got {image.shape}"
                       " (pass a file path to resize and centre-crop it)")
    return image


def _shard_batch(batch: dict, mesh) -> dict:
  """The host arrays as device arrays; with a mesh, the batch axis over its data axes."""
  if mesh is None:
    return {k: None if v is None else jnp.asarray(v) for k, v in batch.items()}
  axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names)
  ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  rows = len(batch["tokens"])
  if rows % ways:
    raise ValueError(f"a batch of {rows} rows does not split over the mesh's {ways} data-parallel"
                     f" devices; use a batch size that is a multiple of {ways}")
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes or None))
  return {k: None if v is None else jax.device_put(v, spec) for k, v in batch.items()}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _continuation_scores(model, tokenizer, visual_vector, params, tokenizer_variables, tokens,
                         image_mask, input_mask, mask_ar, target, images):
  """(B,) summed log-probabilities of the `target` tokens, each predicted from the position
  before it, and (B,) whether every one of them is the argmax."""
  visual = None
  if images is not None:
    pix, sem = V.encode_codes(tokenizer, tokenizer_variables, images)
    visual = V.visual_vectors(tokenizer, tokenizer_variables, pix, sem, visual_vector)
  hidden = model.apply({"params": params}, tokens, image_mask, visual, input_mask, mask_ar,
                       method=M.DualTokenMLLM.hidden_states)
  logits = model.apply({"params": params}, hidden[:, :-1], method=M.DualTokenMLLM.logits)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nxt = tokens[:, 1:]
  picked = jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
  mask = target[:, 1:]
  greedy = (jnp.argmax(logp, axis=-1) == nxt) | ~mask
  return jnp.sum(jnp.where(mask, picked, 0.0), axis=1), jnp.all(greedy, axis=1)


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
