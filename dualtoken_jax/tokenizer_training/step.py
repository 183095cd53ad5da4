"""One jitted tokenizer training step: generator (tokenizer) update, then discriminator update.

Loss (spec B.3, weights from `config.loss`):
  sem_weight·semantic + commit_pix·L_c,pix + commit_sem·L_c,sem
  + mse·MSE(x̂, x) + lpips·LPIPS(x̂, x) + gan.weight·λ·(−mean D(x̂)),
  λ = clamp(‖∇_W L_nll‖ / (‖∇_W L_G‖ + 1e-4), 0.3, 10), W = decoder/conv_out/kernel,
  L_nll = MSE + lpips·LPIPS (unweighted MSE), λ a constant for the gradient.
The discriminator then takes one step on the same, detached x̂. A step whose loss or gradients
are not finite changes nothing (its `finite` metric is 0); the loop counts and halts on those.
The decoder and the pixel terms run in `pixel_loss.py` (in batch chunks, `loss.pixel_chunk`),
and activations follow the config's logical sharding rules (`training.state.activation_sharding`).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dualtoken_jax.losses import semantic as S
from dualtoken_jax.metrics import codebook_stats
from dualtoken_jax.models.dualtoken import DualToken, vision_tower
from dualtoken_jax.tokenizer_training import pixel_loss as PL
from dualtoken_jax.tokenizer_training.state import Modules, TrainState
from dualtoken_jax.training import state as T

Metrics = dict[str, jax.Array]


def teacher_features(tower, teacher_params, images, layer_sem: int):
  """The frozen SigLIP's block-`layer_sem` output and pooled embedding (no gradient)."""
  def run(m, x):
    h = m.encoder(m.embed(x), 0, layer_sem)
    return h, m.pool(m.encoder(h, layer_sem, None))
  tokens, pooled = nn.apply(run, tower)({"params": teacher_params}, images)
  return jax.lax.stop_gradient(tokens), jax.lax.stop_gradient(pooled)


def make_train_step(modules: Modules, lpips: Callable | None, with_gan: bool, mesh=None) -> Callable:
  """(state, images) -> (state, metrics). `lpips`: (x̂, x) -> (B,) distances, or None. `mesh`:
  where activations are sharded (default: the mesh `images` arrive on)."""
  config = modules.config
  loss_cfg, gan_cfg = config.loss, config.gan
  weights = S.SemanticWeights(**loss_cfg.semantic)
  model, disc = modules.model, modules.discriminator
  tower = vision_tower(config.model)
  update_codebooks = tuple(config.update_codebooks)
  # Images per batch shard that the decoder, LPIPS and D see at a time (0 = all), and whether
  # the decoder's activations are recomputed in the backward pass (see pixel_loss.py).
  chunk, remat = loss_cfg.pixel_chunk, config.model.decoder.remat

  def step(state: TrainState, images) -> tuple[TrainState, Metrics]:
    # Inside jit, `images`' abstract sharding names the mesh when none is given.
    on = mesh if mesh is not None else getattr(jax.typeof(images).sharding, "mesh", None)
    with T.activation_sharding(config.sharding_rules, on):
      return sharded_step(state, images)

  def sharded_step(state: TrainState, images) -> tuple[TrainState, Metrics]:
    key, vq_key = jax.random.split(state.key())
    t_tokens, t_pooled = teacher_features(tower, state.teacher, images, config.model.layer_sem)

    def loss_fn(params):
      variables = {"params": params, "vq_stats": state.vq_stats}
      out, updates = model.apply(variables, images, train=True, update_codebooks=update_codebooks,
                                 decode=False, mutable=["vq_stats"], rngs={"vq": vq_key})
      sem, parts = S.semantic_loss(out["zq_sem"], t_tokens, out["pooled"], t_pooled, weights)
      total = (loss_cfg.sem_weight * sem + loss_cfg.commit_pix * out["quant_loss_pix"]
               + loss_cfg.commit_sem * out["quant_loss_sem"])
      aux = {"loss/semantic": sem, "loss/commit_pix": out["quant_loss_pix"],
             "loss/commit_sem": out["quant_loss_sem"], **{f"semantic/{k}": v for k, v in parts.items()}}
      recon = None
      if loss_cfg.pixel:
        def decode(zq_pix):
          recon, sown = model.apply(variables, zq_pix, train=True, method=DualToken.decode,
                                    mutable=["intermediates"])
          return recon, sown["intermediates"]["decoder"]["conv_out_input"][0]

        disc_fn = (lambda r: disc.apply({"params": state.disc_params}, r)) if with_gan else None
        pixel, pixel_metrics, recon = PL.pixel_loss(
            decode, out["zq_pix"], images, conv_out_params=params["decoder"]["conv_out"],
            lpips=lpips, disc_fn=disc_fn, loss_cfg=loss_cfg, gan_cfg=gan_cfg, chunk=chunk,
            remat=remat)
        total = total + pixel
        aux.update(pixel_metrics)
      aux["loss/total"] = total
      return total, (aux, updates["vq_stats"], out, recon)

    grads, (metrics, vq_stats, out, recon) = jax.grad(loss_fn, has_aux=True)(state.params)
    tx = modules.tx(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(metrics["loss/total"]) & jnp.isfinite(grad_norm)
    metrics.update({"grad_norm": grad_norm, "lr": modules.schedule(state.step)})

    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    if with_gan:
      d_weight = jnp.where(state.step // config.steps_per_epoch == gan_cfg.start_step // config.steps_per_epoch,
                           gan_cfg.start_epoch_d_weight, gan_cfg.d_weight)
      d_loss, d_grads, real, fake = PL.discriminator_grads(
          lambda dp, x: disc.apply({"params": dp}, x), disc_params, images, recon, d_weight, chunk)
      d_updates, disc_opt_state = modules.disc_tx().update(d_grads, disc_opt_state, disc_params)
      disc_params = optax.apply_updates(disc_params, d_updates)
      finite = finite & jnp.isfinite(d_loss)
      metrics.update({"loss/discriminator": d_loss, "gan/logits_real": real, "gan/logits_fake": fake,
                      "gan/d_lr": modules.disc_schedule(state.step - gan_cfg.start_step)})

    metrics.update(codebook_metrics(out, state.vq_stats, config.model))
    metrics["finite"] = finite.astype(jnp.float32)
    new = state.replace(step=state.step + 1, params=params, vq_stats=vq_stats, opt_state=opt_state,
                        disc_params=disc_params, disc_opt_state=disc_opt_state,
                        rng=jax.random.key_data(key))
    new = T.keep_if_finite(finite, new, state, ("params", "vq_stats", "opt_state", "disc_params",
                                                "disc_opt_state"))
    return new, metrics

  return step


def codebook_metrics(out: dict[str, Any], vq_stats, model_config) -> Metrics:
  """Per quantizer and depth level: batch code usage and perplexity; dead codes (EMA count < 1)."""
  metrics = {}
  for branch in ("pix", "sem"):
    k = model_config[f"vq_{branch}"].codebook_size
    codes = out[f"codes_{branch}"]
    counts = codebook_stats.histogram_jax(codes.reshape(-1, codes.shape[-1]), k).astype(jnp.float32)
    p = counts / jnp.sum(counts, axis=-1, keepdims=True)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    for level in range(counts.shape[0]):
      metrics[f"codebook_{branch}/usage_level{level}"] = jnp.mean(counts[level] > 0)
      metrics[f"codebook_{branch}/perplexity_level{level}"] = jnp.exp(entropy[level])
    metrics[f"codebook_{branch}/dead_codes"] = jnp.sum(
        vq_stats[f"quantizer_{branch}"]["cluster_size"] < 1.0).astype(jnp.float32)
  return metrics
