"""The DualToken tokenizer: one SigLIP tower, two residual-quantised vocabularies.

Forward (1-based blocks; spec A.3):
  h0 = embed(x); run blocks 1..L_sem, tapping
    s = prequant_shortcut(h[L_shortcut]),  p = prequant_pix(h[L_recon]);
  pixel:    p + w·s -> quantizer_pix -> codes_pix, zq_pix;
  semantic: prequant_sem(h[L_sem]) -> quantizer_sem -> codes_sem -> postquant_sem = zq_sem,
            which *replaces* the hidden state: blocks L_sem+1..L, post-LN and MAP head run on it;
  decode:   postquant_pix(zq_pix) -> grid -> bilinear resize -> post_quant_conv -> decoder.
Taps are block-range boundaries, so no layer's activation is kept beyond its use.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dualtoken_jax.models import config as model_config
from dualtoken_jax.models.attn_projection import AttnProjection
from dualtoken_jax.models.pixel_decoder import Decoder, PostQuantResnetBlock, resize_latent
from dualtoken_jax.models.text import TextTower
from dualtoken_jax.models.vit import VisionTower
from dualtoken_jax.quantization.quantizer import ResidualQuantizer


def vision_tower(config, **overrides) -> VisionTower:
  """The SigLIP image tower a tokenizer config describes (also the frozen teacher's module)."""
  v = config.vision
  kw = dict(patch_size=v.patch_size, grid=model_config.grid_size(config), width=v.width,
            depth=v.depth, mlp_dim=v.mlp_dim, num_heads=v.num_heads,
            layer_norm_eps=v.layer_norm_eps, scan=config.scan_layers,
            remat_policy=model_config.REMAT_POLICIES[config.remat_policy],
            dtype=jnp.dtype(config.dtype), attention_chunk=config.attention_chunk,
            attention_impl=config.attention_impl, pallas_interpret=config.pallas_interpret)
  kw.update(overrides)
  return VisionTower(**kw)


def _quantizer(q, config) -> ResidualQuantizer:
  return ResidualQuantizer(
      codebook_size=q.codebook_size, embed_dim=q.embed_dim, depth=q.depth, decay=q.decay,
      eps=q.eps, restart_unused_codes=q.restart_unused_codes, ema_update=q.ema_update,
      reference_aliasing_bug=q.reference_aliasing_bug, distance_chunk=q.distance_chunk,
      nearest_code_impl=config.nearest_code_impl, pallas_interpret=config.pallas_interpret)


class DualToken(nn.Module):
  config: ml_collections.FrozenConfigDict

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    remat = model_config.REMAT_POLICIES[c.remat_policy]
    v = c.vision
    self.img = vision_tower(c)
    if c.text is not None:
      t = c.text
      self.txt = TextTower(
          vocab_size=t.vocab_size, max_len=t.max_len, width=t.width, depth=t.depth,
          mlp_dim=t.mlp_dim, num_heads=t.num_heads, out_dim=t.out_dim,
          layer_norm_eps=t.layer_norm_eps, scan=c.scan_layers, remat_policy=remat, dtype=dtype)
    # SigLIP's log-temperature and bias (big_vision names); only zero-shot scoring reads them.
    self.t = self.param("t", nn.initializers.constant(jnp.log(10.0)), (1,), jnp.float32)
    self.b = self.param("b", nn.initializers.constant(-10.0), (1,), jnp.float32)

    pix, sem = c.vq_pix, c.vq_sem
    heads = lambda q: model_config.projection_heads(c, q.embed_dim)
    # The projections attend with width/32 heads (36 at So400m) over all tokens: their attention
    # maps outweigh a ViT block's, so they follow the tower's remat policy.
    cls = (nn.remat(AttnProjection, policy=getattr(jax.checkpoint_policies, remat)) if remat
           else AttnProjection)
    proj = functools.partial(cls, attention_chunk=c.attention_chunk,
                             attention_impl=c.attention_impl, pallas_interpret=c.pallas_interpret)
    self.prequant_pix = proj(pix.embed_dim, heads(pix), dtype=dtype)
    if c.layer_shortcut is not None:
      self.prequant_shortcut = proj(pix.embed_dim, heads(pix), dtype=dtype)
    self.prequant_sem = proj(sem.embed_dim, heads(sem), dtype=dtype)
    self.postquant_pix = proj(v.width, heads(pix), causal=True, dtype=dtype)
    self.postquant_sem = proj(v.width, heads(sem), causal=True, dtype=dtype)
    self.quantizer_pix = _quantizer(pix, c)
    self.quantizer_sem = _quantizer(sem, c)
    d = c.decoder
    self.post_quant_conv = PostQuantResnetBlock(d.in_channels, dropout=d.dropout, dtype=dtype,
                                                conv_impl=c.conv_impl)
    self.decoder = Decoder(ch=d.ch, ch_mult=d.ch_mult, num_res_blocks=d.num_res_blocks,
                           attn_resolutions=d.attn_resolutions, out_ch=d.out_ch,
                           dropout=d.dropout, remat=d.remat, dtype=dtype, conv_impl=c.conv_impl)

  # ---------------------------------------------------------------- encode
  def encode(self, images, train: bool = False, collect_hidden: bool = False,
             update_codebooks: tuple[str, ...] = ("pix", "sem")) -> dict[str, Any]:
    """Images (B,H,W,3) in [-1,1] -> codes, quantised features, pooled embedding, losses.

    With `train=True` the EMA codebooks named in `update_codebooks` are updated (stage 2 of
    the recipe keeps the pixel codebook fixed).
    """
    c = self.config
    h = self.img.embed(images)
    hidden = [h[None]]
    taps = {}
    start = 0
    for stop in sorted({c.layer_recon, c.layer_sem} | ({c.layer_shortcut} - {None})):
      h = self._blocks(h, start, stop, collect_hidden, hidden)
      if stop == c.layer_shortcut:
        taps["shortcut"] = self.prequant_shortcut(h)
      if stop == c.layer_recon:
        taps["recon"] = self.prequant_pix(h)
      start = stop

    b, n, _ = h.shape
    g = model_config.grid_size(c)
    p = taps["recon"]
    if c.layer_shortcut is not None:
      p = p + c.weight_shortcut * taps["shortcut"]
    pix = self.quantizer_pix(p.reshape(b, g, g, -1), train and "pix" in update_codebooks)
    sem = self.quantizer_sem(self.prequant_sem(h).reshape(b, g, g, -1), train and "sem" in update_codebooks)
    zq_sem = self.postquant_sem(sem.quantized.reshape(b, n, -1))

    h = self._blocks(zq_sem, c.layer_sem, c.vision.depth, collect_hidden, hidden)
    pooled = self.img.pool(h)
    out = dict(
        codes_pix=pix.codes, codes_sem=sem.codes,
        zq_pix=pix.quantized.reshape(b, n, -1), zq_sem=zq_sem,
        pooled=pooled, image_embeds=l2_normalize(pooled),
        quant_loss_pix=pix.loss, quant_loss_sem=sem.loss)
    if collect_hidden:
      out["hidden_states"] = jnp.concatenate(hidden, axis=0)
    return out

  def _blocks(self, h, start, stop, collect, hidden):
    if not collect:
      return self.img.encoder(h, start, stop)
    h, states = self.img.encoder(h, start, stop, collect=True)
    hidden.append(states)
    return h

  # ---------------------------------------------------------------- decode
  def decode(self, zq_pix, train: bool = False):
    """Quantised pixel vectors (B, N, d) -> images (B, H, W, 3)."""
    c = self.config
    b, n, _ = zq_pix.shape
    g = model_config.grid_size(c)
    u = self.postquant_pix(zq_pix).reshape(b, g, g, -1)
    if c.decoder_latent_shape is not None:
      u = resize_latent(u, c.decoder_latent_shape)
    return self.decoder(self.post_quant_conv(u, train), train).astype(jnp.float32)

  def decode_codes(self, codes_pix):
    """Pixel codes (B, h, w, D) -> images: sum the code embeddings over depth, then decode."""
    b = codes_pix.shape[0]
    z = self.quantizer_pix.embed(codes_pix).sum(axis=-2)
    return self.decode(z.reshape(b, -1, z.shape[-1]))

  def decode_code_levels(self, codes_pix, levels):
    """Pixel codes (B, h, w, D) -> images from the first `levels` ((B,) or scalar ints) residual
    levels of each image: the finer levels' embeddings are left out of the sum, so this equals
    `decode_codes(codes_pix[..., :k])` for every k at one compiled shape."""
    b, depth = codes_pix.shape[0], codes_pix.shape[-1]
    keep = jnp.arange(depth)[None] < jnp.reshape(levels, (-1, 1))  # (B or 1, D)
    e = self.quantizer_pix.embed(codes_pix)
    z = jnp.where(keep[:, None, None, :, None], e, 0.0).sum(axis=-2)
    return self.decode(z.reshape(b, -1, z.shape[-1]))

  def code_embeddings(self, codes_pix, codes_sem):
    """Sums over depth of the code embeddings: (B,h,w,d_pix), (B,h,w,d_sem)."""
    return (self.quantizer_pix.embed(codes_pix).sum(axis=-2),
            self.quantizer_sem.embed(codes_sem).sum(axis=-2))

  def per_depth_embeddings(self, codes_pix, codes_sem):
    """Code embeddings per depth, not summed: (B,h,w,D,d_pix), (B,h,w,D,d_sem)."""
    return self.quantizer_pix.embed(codes_pix), self.quantizer_sem.embed(codes_sem)

  def codebooks(self):
    """The (shared-over-depth) codebooks: (K_pix, d_pix), (K_sem, d_sem)."""
    return self.quantizer_pix.codebook.value, self.quantizer_sem.codebook.value

  def semantic_from_codes(self, codes_sem):
    """Semantic codes -> post-quant semantic features (B, h*w, width)."""
    b = codes_sem.shape[0]
    z = self.quantizer_sem.embed(codes_sem).sum(axis=-2)
    return self.postquant_sem(z.reshape(b, -1, z.shape[-1]))

  # ---------------------------------------------------------------- other towers
  def teacher(self, images, collect_hidden: bool = False):
    """Plain SigLIP on the same weights (the frozen teacher when applied to its own params)."""
    return self.img(images, collect=collect_hidden)

  def siglip_embedding(self, images):
    """L2-normalised plain SigLIP embedding (B, width): `teacher`'s pooled output, no quantiser."""
    return l2_normalize(self.teacher(images))

  def encode_text(self, tokens):
    if self.config.text is None:
      raise ValueError("this tokenizer config has no text tower (config.text is None)")
    return l2_normalize(self.txt(tokens))

  def __call__(self, images, train: bool = False, collect_hidden: bool = False,
               update_codebooks: tuple[str, ...] = ("pix", "sem"), decode: bool = True):
    out = self.encode(images, train, collect_hidden, update_codebooks)
    if decode:
      out["recon"] = self.decode(out["zq_pix"], train)
    return out

  def initialize(self, images):
    """Touches every submodule (the text tower too), for `init`."""
    out = self(images)
    if self.config.text is not None:
      out["text"] = self.encode_text(jnp.zeros((1, self.config.text.max_len), jnp.int32))
    return out


def init_variables(config, rng: jax.Array) -> dict:
  """Randomly initialised {"params", "vq_stats"} (unboxed) for a tokenizer config."""
  model = DualToken(ml_collections.FrozenConfigDict(config))
  size = config.image_size
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  variables = model.init({"params": rng}, images, method=DualToken.initialize)
  return nn.meta.unbox(variables)


def abstract_variables(config) -> dict:
  """Shapes and dtypes of `init_variables`, without computing anything."""
  return jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))


def l2_normalize(x, eps=1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
