"""The MLLM's jitted training and evaluation steps.

A batch is a dict of global arrays (`data.py`): `tokens`, `image_mask`, `input_mask`,
`loss_mask`, `mask_ar`, `gen_mask`, `has_image`, and either `image` (the frozen tokenizer
encodes it inside the step) or `codes_pixel` + `codes_semantic` (pre-computed). Loss (spec
D.2, VILA-U's normalisation): `text_weight` x the mean cross-entropy over the scored text
tokens of the whole (global) batch (token t predicted at position t - 1), plus, when the run
has caption data, `image_weight` x the mean cross-entropy over every (position, depth) code
prediction of both heads on the generation rows (teacher-forced; image-code targets never
enter the text loss).
A step whose loss or gradient is not finite changes nothing but the step and RNG (its
`finite` metric is 0: `training.state.keep_if_finite`), as in the tokenizer's step.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from dualtoken_jax.mllm import depth_head
from dualtoken_jax.mllm import projector as V
from dualtoken_jax.mllm.model import DualTokenMLLM
from dualtoken_jax.mllm.state import MLLMState, Modules
from dualtoken_jax.models.dualtoken import DualToken
from dualtoken_jax.training import state as T

Metrics = dict[str, jax.Array]


def batch_codes(modules: Modules, tokenizer_variables, batch):
  """(pixel, semantic) codes (B, h, w, D) of the batch's images, or the pre-computed ones."""
  if "image" in batch:
    return V.encode_codes(modules.tokenizer, tokenizer_variables, batch["image"])
  return batch["codes_pixel"], batch["codes_semantic"]


def visual_inputs(modules: Modules, tokenizer_variables, batch, codes=None) -> jax.Array:
  """(B, N, C) visual vectors of the batch's images or pre-computed codes (no gradient)."""
  pix, sem = codes if codes is not None else batch_codes(modules, tokenizer_variables, batch)
  return V.visual_vectors(modules.tokenizer, tokenizer_variables, pix, sem,
                          modules.config.model.visual_vector)


def image_positions(image_mask, n: int):
  """(B, L) mask with N or 0 True entries per row -> (B, N) their indices (0 where none)."""
  return jax.vmap(lambda row: jnp.nonzero(row, size=n, fill_value=0)[0])(image_mask)


def code_loss(modules: Modules, params, tokenizer_variables, pre_logits, batch, codes, rng):
  """Teacher-forced CE of both heads, mean over every (row, position, depth) prediction of the
  generation rows (`gen_mask`): the hidden state at position p - 1 predicts the codes of image
  position p. Returns (loss, metrics)."""
  n = codes[0].shape[1] * codes[0].shape[2]
  index = image_positions(batch["gen_mask"], n)
  rows = batch["gen_mask"].any(axis=1).astype(jnp.float32)                  # (B,)
  hidden = jnp.take_along_axis(pre_logits, jnp.maximum(index - 1, 0)[..., None], axis=1)
  embeddings = modules.tokenizer.apply(tokenizer_variables, *codes,
                                       method=DualToken.per_depth_embeddings)
  sums, counts, metrics = 0.0, 0.0, {}
  for branch, c, e, key in zip(("pixel", "semantic"), codes, embeddings, jax.random.split(rng)):
    b, depth = c.shape[0], c.shape[-1]
    logits = modules.model.apply({"params": params}, branch, hidden,
                                 jax.lax.stop_gradient(e.reshape(b, n, depth, -1)),
                                 deterministic=False, rngs={"dropout": key},
                                 method=DualTokenMLLM.head_logits)
    ce, acc = depth_head.cross_entropy(logits, c.reshape(b, n, depth), rows[:, None, None])
    count = rows.sum() * n * depth
    sums, counts = sums + ce * count, counts + count
    metrics.update({f"{branch}_code_loss": ce, f"{branch}_code_accuracy": acc})
  return sums / jnp.maximum(counts, 1.0), metrics


def token_nll(logits, tokens, loss_mask):
  """Per-target negative log-likelihood and correctness, shifted: logits (B, L, V) at t score
  tokens[t + 1]. Returns (nll (B, L-1), correct (B, L-1), weights (B, L-1) float32)."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = tokens[:, 1:]
  weights = loss_mask[:, 1:].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return nll, correct, weights


def _forward(modules: Modules, params, visual, batch):
  return modules.model.apply({"params": params}, batch["tokens"], batch["image_mask"], visual,
                             batch["input_mask"], batch["mask_ar"])


def trains_generation(config) -> bool:
  """Whether the step computes the heads' code loss (static: caption data is configured)."""
  return bool(config.data.captions)


def make_train_step(modules: Modules, mesh=None, generation: bool | None = None) -> Callable:
  """(state, batch) -> (state, metrics). With `mesh`, activations follow the logical rules.
  `generation` (default: `trains_generation(config)`) adds the heads' code loss."""
  if generation is None:
    generation = trains_generation(modules.config)
  weights = modules.config.loss

  def step(state: MLLMState, batch) -> tuple[MLLMState, Metrics]:
    key, head_key = jax.random.split(state.key())
    codes = batch_codes(modules, state.tokenizer, batch)
    visual = visual_inputs(modules, state.tokenizer, batch, codes)

    def loss_fn(params):
      with T.activation_sharding(modules.rules, mesh):
        pre = modules.model.apply({"params": params}, batch["tokens"], batch["image_mask"],
                                  visual, batch["input_mask"], batch["mask_ar"],
                                  method=DualTokenMLLM.hidden_states)
        logits = modules.model.apply({"params": params}, pre, method=DualTokenMLLM.logits)
      nll, correct, w = token_nll(logits, batch["tokens"], batch["loss_mask"])
      count = jnp.maximum(w.sum(), 1.0)
      text_loss = (nll * w).sum() / count
      metrics = {"text_loss": text_loss, "accuracy": (correct * w).sum() / count,
                 "answer_tokens": w.sum()}
      loss = weights.text_weight * text_loss
      if generation:
        image_loss, head_metrics = code_loss(modules, params, state.tokenizer, pre, batch, codes,
                                             head_key)
        loss = loss + weights.image_weight * image_loss
        metrics.update(head_metrics, image_loss=image_loss)
      metrics["loss"] = loss
      return loss, metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    tx = modules.tx(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    metrics.update({"grad_norm": grad_norm, "lr": modules.schedule(state.step),
                    "finite": finite.astype(jnp.float32)})
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                        rng=jax.random.key_data(key))
    return T.keep_if_finite(finite, new, state, ("params", "opt_state")), metrics

  return step


def make_eval_step(modules: Modules, mesh=None) -> Callable:
  """(params, tokenizer variables, batch) -> sums over the batch's answer tokens, and each
  row's answer NLL (summed over its answer tokens) with the rows that have one."""

  def step(params, tokenizer_variables, batch) -> Metrics:
    visual = visual_inputs(modules, tokenizer_variables, batch)
    with T.activation_sharding(modules.rules, mesh):
      logits = _forward(modules, params, visual, batch)
    nll, correct, weights = token_nll(logits, batch["tokens"], batch["loss_mask"])
    return {"nll_sum": (nll * weights).sum(), "correct_sum": (correct * weights).sum(),
            "tokens": weights.sum(), "row_nll": (nll * weights).sum(axis=1),
            "row_valid": weights.sum(axis=1) > 0,
            "row_exact": jnp.all((correct > 0) | (weights == 0), axis=1)}

  return step
