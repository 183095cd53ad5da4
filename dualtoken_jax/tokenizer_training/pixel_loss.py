"""Stage-1 pixel terms (MSE, LPIPS, adaptive-weight GAN) and the discriminator's gradients in
batch chunks. The maths is `step.py`'s; what this module changes is memory and work:

* x̂'s gradient from the pixel terms is formed once. λ needs ∇_x̂ L_nll and ∇_x̂ L_G before the
  backward pass anyway; LPIPS and D are each differentiated once, on the detached x̂, and those
  gradients become x̂'s cotangent in the backward pass (`_with_cotangent`) instead of LPIPS and D
  being differentiated a second time there.
* The decoder, LPIPS and D treat images independently (GroupNorm, per-image distances and
  logits), so they can run `chunk` images per batch shard at a time in a loop (`map_chunks`),
  the decoder rematerialised per chunk: at 384 px their full-resolution feature maps, not the
  model's size, set a training step's memory. Batch means become sums of per-chunk shares.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualtoken_jax.parallel import sharding
from dualtoken_jax.losses import gan as G
from dualtoken_jax.models.pixel_decoder import apply_conv_out

Metrics = dict[str, jax.Array]


def batch_shards() -> int:
  """How many ways the batch axis is split over devices (1 outside a mesh context)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return math.prod(mesh.shape.get(a, 1) for a in sharding.BATCH_AXES)


def map_chunks(fn: Callable, xs, chunk: int, remat: bool = False):
  """`fn(xs) -> (per_image, summed)` evaluated `chunk` images per batch shard at a time.

  A sequential loop whose step i takes the i-th `chunk` images of every shard, so each step keeps
  the batch sharding and no image moves between devices. Per-image outputs come back in the
  original order; `summed` outputs are added over the steps. `fn` must treat images independently.
  `remat`: each step's activations are recomputed in the backward pass instead of being saved.
  `chunk` <= 0 or >= the images per shard: a single call on the whole batch; a `chunk` that does
  not divide the images per shard is lowered to the largest one that does.
  """
  b = jax.tree.leaves(xs)[0].shape[0]
  shards = batch_shards()
  shards = shards if b % shards == 0 else 1
  per_shard = b // shards
  if chunk <= 0 or chunk >= per_shard:
    return fn(xs)
  chunk = max(d for d in range(1, chunk + 1) if per_shard % d == 0)
  n = per_shard // chunk

  def split(a):  # (B, ...) -> (n, shards·chunk, ...)
    a = a.reshape((shards, n, chunk) + a.shape[1:]).swapaxes(0, 1)
    return _batch_sharded(a.reshape((n, shards * chunk) + a.shape[3:]), axis=1)

  def merge(a):  # (n, shards·chunk, ...) -> (B, ...), the inverse of `split`
    a = a.reshape((n, shards, chunk) + a.shape[2:]).swapaxes(0, 1)
    return _batch_sharded(a.reshape((b,) + a.shape[3:]), axis=0)

  body = jax.checkpoint(fn, prevent_cse=False) if remat else fn  # a loop body: no CSE across steps
  per_image, summed = jax.lax.map(lambda x: body(jax.tree.map(_batch_sharded, x)),
                                  jax.tree.map(split, xs))
  return jax.tree.map(merge, per_image), jax.tree.map(lambda a: jnp.sum(a, axis=0), summed)


def _batch_sharded(a, axis: int = 0):
  names = [None] * a.ndim
  names[axis] = "act_batch"
  return nn.with_logical_constraint(a, tuple(names))


def pixel_loss(decode: Callable, latents, images, *, conv_out_params, lpips: Callable | None,
               disc_fn: Callable | None, loss_cfg, gan_cfg, chunk: int, remat: bool
               ) -> tuple[jax.Array, Metrics, jax.Array]:
  """(weighted pixel loss, metrics, detached x̂).

  `decode(latents) -> (x̂, conv_out's input)` runs the decoder (closing over the trained params);
  `lpips(x̂, x) -> (B,)` or None; `disc_fn(x̂) -> logits` (frozen D params) or None for no GAN.
  The loss's value is mse·MSE + lpips·LPIPS [+ gan.weight·λ·L_G] and its gradient w.r.t. x̂ is
  that expression's, λ a constant; `conv_out_params` ({kernel, bias}) gives λ's W.
  """
  b = images.shape[0]
  lpips_w = loss_cfg.lpips if lpips is not None else 0.0
  conv_out_params = jax.lax.stop_gradient(conv_out_params)

  def per_chunk(xs):
    z, x = xs
    recon, h = decode(z)
    r, h = jax.lax.stop_gradient(recon), jax.lax.stop_gradient(h)
    # Each term is this chunk's share of a batch mean (its images' sum / B), so its gradient is
    # the batch mean's gradient w.r.t. these images.
    share = lambda per_image: jnp.sum(per_image) / b
    mse, g_mse = jax.value_and_grad(lambda r: share(jnp.mean((r - x) ** 2, axis=(1, 2, 3))))(r)
    lp, g_lp = jnp.zeros(()), jnp.zeros_like(r)
    if lpips is not None:
      lp, g_lp = jax.value_and_grad(lambda r: share(lpips(r, x)))(r)
    per_image = {"recon": recon, "cotangent": loss_cfg.mse * g_mse + lpips_w * g_lp}
    summed = {"mse": mse, "lpips": lp}
    if disc_fn is not None:
      gen, g_gen = jax.value_and_grad(lambda r: -share(jnp.mean(disc_fn(r), axis=(1, 2, 3))))(r)
      # λ's gradients w.r.t. conv_out's kernel, through its input h: summed over the chunks they
      # are the batch's. L_nll = MSE (unweighted) + lpips·LPIPS.
      _, vjp = jax.vjp(lambda k: apply_conv_out({**conv_out_params, "kernel": k}, h, r.shape[-1]),
                       conv_out_params["kernel"])
      (w_nll,) = vjp((g_mse + lpips_w * g_lp).astype(h.dtype))
      (w_gen,) = vjp(g_gen.astype(h.dtype))
      per_image["g_gen"] = g_gen
      summed.update(generator=gen, w_nll=w_nll, w_gen=w_gen)
    return per_image, summed

  per_image, s = map_chunks(per_chunk, (latents, images), chunk, remat)
  recon, cotangent = per_image["recon"], per_image["cotangent"]
  total = loss_cfg.mse * s["mse"] + lpips_w * s["lpips"]
  metrics = {"loss/mse": s["mse"], "loss/lpips": s["lpips"]}
  if disc_fn is not None:
    lam = G.adaptive_gan_weight(s["w_nll"], s["w_gen"], gan_cfg.adaptive_min, gan_cfg.adaptive_max)
    total = total + gan_cfg.weight * lam * s["generator"]
    cotangent = cotangent + gan_cfg.weight * lam * per_image["g_gen"]
    metrics.update({"loss/generator": s["generator"], "gan/adaptive_weight": lam})
  return total + _with_cotangent(recon, cotangent), metrics, jax.lax.stop_gradient(recon)


def _with_cotangent(x, cotangent):
  """0 in value (x − x, exactly), with gradient `cotangent` (a constant) w.r.t. x."""
  return jnp.sum(jax.lax.stop_gradient(cotangent) * (x - jax.lax.stop_gradient(x)))


def discriminator_grads(disc_apply: Callable, disc_params, images, recon, weight, chunk: int
                        ) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
  """(D loss, its gradient w.r.t. `disc_params`, mean D(x), mean D(x̂)) for the D step on real
  `images` and detached `recon`, `chunk` images per batch shard at a time."""
  b = images.shape[0]

  def per_chunk(xs):
    x, r = xs
    share = x.shape[0] / b  # the chunk's share of each batch mean

    def loss_fn(dp):
      real, fake = disc_apply(dp, x), disc_apply(dp, r)
      loss = share * G.discriminator_loss(real, fake, weight=weight)
      return loss, (jnp.mean(real), jnp.mean(fake))

    (loss, (real, fake)), grads = jax.value_and_grad(loss_fn, has_aux=True)(disc_params)
    return {}, (loss, grads, share * real, share * fake)

  _, out = map_chunks(per_chunk, (images, jax.lax.stop_gradient(recon)), chunk)
  return out
