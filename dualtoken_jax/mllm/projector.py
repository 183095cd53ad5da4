"""Dual-token visual input (paper section 3.3, spec D.1): codes -> visual vectors -> LLM width.

At each of the N image positions the pixel and the semantic visual vectors are concatenated
along channels and mapped to the LLM width by a 2-layer GELU MLP (the appendix's
2048 -> 2048 -> 2048: concatenate first, then project). Two choices of visual vector, by
`config.visual_vector`:

  "code_embeddings" (default)  sum over depth of the code embeddings, per branch
                               (d_pix + d_sem channels): VILA-U's and the paper's input. It is
                               also the vector part 2 feeds back for each generated position.
  "postquant"                  the tokenizer's post-quant blocks (`postquant_pix`,
                               `postquant_sem`) on those sums: 2 x ViT-width channels, closer to
                               SigLIP's own features. The blocks are causal in raster order, so a
                               generated prefix gets the same vectors it would get in full.

Both start from codes, so images encoded inside the step and pre-computed codes give
bit-identical vectors. The tokenizer's variables are frozen inputs here: nothing in this
module differentiates them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dualtoken_jax.models import partitioning as P
from dualtoken_jax.models.dualtoken import DualToken


# ---------------------------------------------------------------- pure maths
def gather_image_embeddings(token_embeddings, image_embeddings, image_mask):
  """Puts image embeddings at the image positions of a token sequence.

  Args:
    token_embeddings: (B, L, D) embeddings of the token ids (garbage at image positions).
    image_embeddings: (B, N, D) projected visual vectors, raster order.
    image_mask: (B, L) bool, True at the N image positions of rows that hold an image (all
      False for text-only rows).

  Returns:
    (B, L, D): the k-th True position of a row holds that row's k-th image embedding.
  """
  n = image_embeddings.shape[1]
  index = jnp.clip(jnp.cumsum(image_mask.astype(jnp.int32), axis=1) - 1, 0, n - 1)
  at_positions = jnp.take_along_axis(image_embeddings, index[..., None], axis=1)
  return jnp.where(image_mask[..., None], at_positions.astype(token_embeddings.dtype),
                   token_embeddings)


# ---------------------------------------------------------------- tokenizer side (frozen)
def encode_codes(tokenizer: DualToken, variables, images):
  """Images (B, H, W, 3) in [-1, 1] -> (pixel, semantic) int32 codes (B, h, w, D)."""
  out = tokenizer.apply(variables, images, method=DualToken.encode)
  return out["codes_pix"], out["codes_sem"]


def _postquant(module: DualToken, codes_pix, codes_sem):
  b = codes_pix.shape[0]
  flat = lambda z: z.reshape(b, -1, z.shape[-1])
  e_pix, e_sem = module.code_embeddings(codes_pix, codes_sem)
  return module.postquant_pix(flat(e_pix)), module.postquant_sem(flat(e_sem))


def visual_vectors(tokenizer: DualToken, variables, codes_pix, codes_sem, choice: str):
  """Codes (B, h, w, D) per branch -> concatenated visual vectors (B, h*w, C), float32,
  without gradient. `choice` is "code_embeddings" or "postquant" (module docstring)."""
  b = codes_pix.shape[0]
  if choice == "code_embeddings":
    pix, sem = tokenizer.apply(variables, codes_pix, codes_sem, method=DualToken.code_embeddings)
    pix, sem = pix.reshape(b, -1, pix.shape[-1]), sem.reshape(b, -1, sem.shape[-1])
  elif choice == "postquant":
    pix, sem = tokenizer.apply(variables, codes_pix, codes_sem, method=_postquant)
  else:
    raise ValueError(f"visual vector {choice!r} is not 'code_embeddings' or 'postquant'")
  vectors = jnp.concatenate([pix.astype(jnp.float32), sem.astype(jnp.float32)], axis=-1)
  return jax.lax.stop_gradient(vectors)


# ---------------------------------------------------------------- the trained part
class Projector(nn.Module):
  """`fc1` (C -> H) + exact GELU + `fc2` (H -> D), LLaVA's `mlp2x_gelu`: visual vectors -> LLM
  input embeddings (not scaled by sqrt(D), like every embedding given to the decoder directly)."""
  hidden_dim: int
  out_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, names, name: nn.Dense(
        n, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=P.boxed(nn.initializers.lecun_normal(), names),
        bias_init=P.boxed(nn.initializers.zeros, names[1:]))
    h = nn.gelu(dense(self.hidden_dim, (None, "mlp"), "fc1")(x), approximate=False)
    return dense(self.out_dim, ("mlp", "embed"), "fc2")(h)
