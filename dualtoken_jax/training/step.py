"""One jitted tokenizer training step: generator (tokenizer) update, then discriminator update.

Loss (spec B.3, weights from `config.loss`):
  sem_weight·semantic + commit_pix·L_c,pix + commit_sem·L_c,sem
  + mse·MSE(x̂, x) + lpips·LPIPS(x̂, x) + gan.weight·λ·(−mean D(x̂)),
  λ = clamp(‖∇_W L_nll‖ / (‖∇_W L_G‖ + 1e-4), 0.3, 10), W = decoder/conv_out/kernel,
  L_nll = MSE + lpips·LPIPS (unweighted MSE), λ a constant for the gradient.
The discriminator then takes one step on the same, detached x̂. A step whose loss or gradients
are not finite changes nothing (its `finite` metric is 0); the loop counts and halts on those.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dualtoken_jax.losses import gan as G
from dualtoken_jax.losses import semantic as S
from dualtoken_jax.metrics import codebook_stats
from dualtoken_jax.models.dualtoken import vision_tower
from dualtoken_jax.models.pixel_decoder import apply_conv_out
from dualtoken_jax.training.state import Modules, TrainState

Metrics = dict[str, jax.Array]


def teacher_features(tower, teacher_params, images, layer_sem: int):
  """The frozen SigLIP's block-`layer_sem` output and pooled embedding (no gradient)."""
  def run(m, x):
    h = m.encoder(m.embed(x), 0, layer_sem)
    return h, m.pool(m.encoder(h, layer_sem, None))
  tokens, pooled = nn.apply(run, tower)({"params": teacher_params}, images)
  return jax.lax.stop_gradient(tokens), jax.lax.stop_gradient(pooled)


def adaptive_weight(conv_params, conv_input, recon, nll_fn, g_fn, lo, hi):
  """λ from the gradients of L_nll and L_G w.r.t. conv_out's kernel, via conv_out's input."""
  h = jax.lax.stop_gradient(conv_input)
  recon = jax.lax.stop_gradient(recon)
  out_ch = recon.shape[-1]
  _, vjp = jax.vjp(lambda kernel: apply_conv_out({**conv_params, "kernel": kernel}, h, out_ch),
                   conv_params["kernel"])
  (g_nll,) = vjp(jax.grad(nll_fn)(recon).astype(h.dtype))
  (g_gen,) = vjp(jax.grad(g_fn)(recon).astype(h.dtype))
  return G.adaptive_gan_weight(g_nll, g_gen, lo, hi)


def make_train_step(modules: Modules, lpips: Callable | None, with_gan: bool) -> Callable:
  """(state, images) -> (state, metrics). `lpips`: (x̂, x) -> (B,) distances, or None."""
  config = modules.config
  loss_cfg, gan_cfg = config.loss, config.gan
  weights = S.SemanticWeights(**loss_cfg.semantic)
  model, disc = modules.model, modules.discriminator
  tower = vision_tower(config.model)
  update_codebooks = tuple(config.update_codebooks)
  lpips_w = loss_cfg.lpips if lpips is not None else 0.0
  if lpips is not None and loss_cfg.get("lpips_remat", False):
    lpips = jax.checkpoint(lpips)  # keep only its inputs; recompute VGG16 in the backward pass

  def pixel_terms(recon, images):
    mse = jnp.mean((recon - images) ** 2)
    lp = jnp.mean(lpips(recon, images)) if lpips is not None else jnp.zeros(())
    return mse, lp

  def nll(recon, images):  # the *unweighted* MSE + LPIPS the adaptive weight balances against
    mse, lp = pixel_terms(recon, images)
    return mse + lpips_w * lp

  def step(state: TrainState, images) -> tuple[TrainState, Metrics]:
    key, vq_key = jax.random.split(state.key())
    t_tokens, t_pooled = teacher_features(tower, state.teacher, images, config.model.layer_sem)

    def loss_fn(params):
      variables = {"params": params, "vq_stats": state.vq_stats}
      out, updates = model.apply(variables, images, train=True, update_codebooks=update_codebooks,
                                 decode=loss_cfg.pixel, mutable=["vq_stats", "intermediates"],
                                 rngs={"vq": vq_key})
      sem, parts = S.semantic_loss(out["zq_sem"], t_tokens, out["pooled"], t_pooled, weights)
      total = (loss_cfg.sem_weight * sem + loss_cfg.commit_pix * out["quant_loss_pix"]
               + loss_cfg.commit_sem * out["quant_loss_sem"])
      aux = {"loss/semantic": sem, "loss/commit_pix": out["quant_loss_pix"],
             "loss/commit_sem": out["quant_loss_sem"], **{f"semantic/{k}": v for k, v in parts.items()}}
      recon = None
      if loss_cfg.pixel:
        recon = out["recon"]
        mse, lp = pixel_terms(recon, images)
        total = total + loss_cfg.mse * mse + lpips_w * lp
        aux.update({"loss/mse": mse, "loss/lpips": lp})
        if with_gan:
          g_fn = lambda r: G.generator_loss(disc.apply({"params": state.disc_params}, r))
          g_loss = g_fn(recon)
          conv_in = updates["intermediates"]["decoder"]["conv_out_input"][0]
          lam = adaptive_weight(params["decoder"]["conv_out"], conv_in, recon,
                                lambda r: nll(r, images), g_fn, gan_cfg.adaptive_min,
                                gan_cfg.adaptive_max)
          total = total + gan_cfg.weight * lam * g_loss
          aux.update({"loss/generator": g_loss, "gan/adaptive_weight": lam})
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
      def d_loss_fn(dp):
        real = disc.apply({"params": dp}, images)
        fake = disc.apply({"params": dp}, jax.lax.stop_gradient(recon))
        return G.discriminator_loss(real, fake, weight=d_weight), (jnp.mean(real), jnp.mean(fake))
      (d_loss, (real, fake)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(disc_params)
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
    # A non-finite step keeps the old weights, statistics and optimiser state (the step and the
    # RNG advance, so the run moves on to the next batch).
    keep = lambda a, b: jnp.where(finite, a, b)
    new = new.replace(params=jax.tree.map(keep, new.params, state.params),
                      vq_stats=jax.tree.map(keep, new.vq_stats, state.vq_stats),
                      opt_state=jax.tree.map(keep, new.opt_state, state.opt_state),
                      disc_params=jax.tree.map(keep, new.disc_params, state.disc_params),
                      disc_opt_state=jax.tree.map(keep, new.disc_opt_state, state.disc_opt_state))
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
