"""Adversarial terms of stage-1 training, as pure functions of discriminator logits and gradients.

Reference (spec B.3): the discriminator minimises a "hinge" loss whose ReLUs are LeakyReLUs with
slope 0.01, scaled by 0.75 except in the GAN start epoch; the generator minimises −mean(D(x̂)),
weighted by 0.75·λ with λ = clamp(‖∇_W L_nll‖ / (‖∇_W L_G‖ + 1e-4), 0.3, 10) treated as a constant,
W being the decoder's last conv kernel and L_nll = MSE + LPIPS (unweighted). All reductions are
float32 whatever the logits' dtype.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

LAST_LAYER = "decoder/conv_out/kernel"  # W of the adaptive weight, as a path in the model's params
GENERATOR_WEIGHT = 0.75                 # the constant factor in front of λ·L_G
DISCRIMINATOR_WEIGHT = 0.75             # the D-loss scale outside the GAN start epoch
HINGE_SLOPE = 0.01                      # F.leaky_relu's default slope, where hinge has a ReLU

Path = str | Sequence[str]


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array, weight: float = 1.0,
                       slope: float = HINGE_SLOPE) -> jax.Array:
  """weight · ½·(mean(lrelu(1 − D(x))) + mean(lrelu(1 + D(x̂)))), lrelu with negative slope `slope`.

  `logits_fake` must come from D(stop_gradient(x̂)): this loss trains the discriminator only.
  Pass `weight=discriminator_loss_weight(...)` to reproduce the reference's schedule.
  """
  real = jnp.mean(jax.nn.leaky_relu(1.0 - logits_real.astype(jnp.float32), slope))
  fake = jnp.mean(jax.nn.leaky_relu(1.0 + logits_fake.astype(jnp.float32), slope))
  return weight * 0.5 * (real + fake)


def discriminator_loss_weight(epoch: int, gan_start_epoch: int,
                              weight: float = DISCRIMINATOR_WEIGHT) -> float:
  """The reference scales the D loss by 0.75 in every epoch except the GAN start epoch (1.0)."""
  return 1.0 if epoch == gan_start_epoch else weight


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """The "vanilla" generator loss −mean(D(x̂)); gradients flow through D into x̂."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def adaptive_gan_weight(nll_grad: jax.Array, g_grad: jax.Array, lo: float = 0.3, hi: float = 10.0,
                        eps: float = 1e-4) -> jax.Array:
  """λ = clamp(‖∇L_nll‖ / (‖∇L_G‖ + eps), lo, hi) with Frobenius norms over the whole leaf.

  Stop-gradient'ed: λ is a constant factor of the generator loss, never differentiated.
  The clamp is the reference's (0.3, 10), not taming's (0, 1e4).
  """
  nll_norm = jnp.sqrt(jnp.sum(jnp.square(nll_grad.astype(jnp.float32))))
  g_norm = jnp.sqrt(jnp.sum(jnp.square(g_grad.astype(jnp.float32))))
  return jax.lax.stop_gradient(jnp.clip(nll_norm / (g_norm + eps), lo, hi))


def last_layer_grads(nll_fn: Callable[[jax.Array], jax.Array], g_fn: Callable[[jax.Array], jax.Array],
                     leaf: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(∇_W nll_fn(W), ∇_W g_fn(W)) at W = `leaf`: two separate gradients of scalar losses.

  The cheap way to build the two functions is from the decoder's activation entering `conv_out`,
  stop-gradient'ed: ∇_W of L(conv(h, W) + b) needs only h and the loss, so the encoder and the
  rest of the decoder do not run again. The exact but costly alternative is
  `lambda w: full_loss(replace_leaf(params, LAST_LAYER, w))`.
  """
  return jax.grad(nll_fn)(leaf), jax.grad(g_fn)(leaf)


def _keys(path: Path) -> tuple[str, ...]:
  return tuple(path.split("/")) if isinstance(path, str) else tuple(path)


def get_leaf(tree: Mapping[str, Any], path: Path = LAST_LAYER) -> Any:
  """The entry of a nested params dict at a '/'-joined path, e.g. "decoder/conv_out/kernel"."""
  keys, node = _keys(path), tree
  for i, k in enumerate(keys):
    if not isinstance(node, Mapping) or k not in node:
      where = "/".join(keys[:i]) or "the root"
      have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      raise KeyError(f"no parameter {'/'.join(keys)!r}: {where} holds {have}")
    node = node[k]
  return node


def replace_leaf(tree: Mapping[str, Any], path: Path, value: Any) -> dict[str, Any]:
  """A copy of `tree` (new dicts along `path` only) with the entry at `path` set to `value`."""
  keys = _keys(path)
  get_leaf(tree, keys)  # same error as get_leaf for a wrong path

  def rebuild(node, rest):
    return {**node, rest[0]: value if len(rest) == 1 else rebuild(node[rest[0]], rest[1:])}

  return rebuild(tree, keys)
