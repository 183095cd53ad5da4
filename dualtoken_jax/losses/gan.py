"""Adversarial terms of stage-1 training, as pure functions of discriminator logits and gradients.

Reference (spec B.3): the discriminator minimises a "hinge" loss whose ReLUs are LeakyReLUs with
slope 0.01, scaled by 0.75 except in the GAN start epoch; the generator minimises −mean(D(x̂)),
weighted by 0.75·λ with λ = clamp(‖∇_W L_nll‖ / (‖∇_W L_G‖ + 1e-4), 0.3, 10) treated as a constant,
W being the decoder's last conv kernel and L_nll = MSE + LPIPS (unweighted). All reductions are
float32 whatever the logits' dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HINGE_SLOPE = 0.01  # F.leaky_relu's default slope, where hinge has a ReLU


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array, weight: float = 1.0,
                       slope: float = HINGE_SLOPE) -> jax.Array:
  """weight · ½·(mean(lrelu(1 − D(x))) + mean(lrelu(1 + D(x̂)))), lrelu with negative slope `slope`.

  `logits_fake` must come from D(stop_gradient(x̂)): this loss trains the discriminator only.
  The reference's schedule of `weight` (0.75, 1.0 in the GAN start epoch) is `config.gan.d_weight`
  / `start_epoch_d_weight` (`tokenizer_training.recipe`).
  """
  real = jnp.mean(jax.nn.leaky_relu(1.0 - logits_real.astype(jnp.float32), slope))
  fake = jnp.mean(jax.nn.leaky_relu(1.0 + logits_fake.astype(jnp.float32), slope))
  return weight * 0.5 * (real + fake)


def adaptive_gan_weight(nll_grad: jax.Array, g_grad: jax.Array, lo: float = 0.3, hi: float = 10.0,
                        eps: float = 1e-4) -> jax.Array:
  """λ = clamp(‖∇L_nll‖ / (‖∇L_G‖ + eps), lo, hi) with Frobenius norms over the whole leaf.

  Stop-gradient'ed: λ is a constant factor of the generator loss, never differentiated.
  The clamp is the reference's (0.3, 10), not taming's (0, 1e4).
  """
  nll_norm = jnp.sqrt(jnp.sum(jnp.square(nll_grad.astype(jnp.float32))))
  g_norm = jnp.sqrt(jnp.sum(jnp.square(g_grad.astype(jnp.float32))))
  return jax.lax.stop_gradient(jnp.clip(nll_norm / (g_norm + eps), lo, hi))
