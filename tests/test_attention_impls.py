"""Every attention implementation (`models/attention.py`) computes the same attention.

On CPU: "chunked" (Flax, query-blocked) and "xla" (jax.nn.dot_product_attention) agree within
1e-5 in values and gradients, directly and inside the ViT, the projections and the decoder LLM;
the Pallas TPU flash kernel runs in the TPU interpreter (`interpret=True`) against them. cuDNN
cannot run here: its test is the clear error on a non-GPU backend.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualtoken_jax.config_files import ConfigError
from dualtoken_jax.llm import config as llm_config
from dualtoken_jax.llm.lm import DecoderLM
from dualtoken_jax.models import attention as A
from dualtoken_jax.models import config as mc
from dualtoken_jax.models.attn_projection import AttnProjection
from dualtoken_jax.models.vit import VisionTower

TOL = dict(rtol=1e-5, atol=1e-5)


def _qkv(b=2, t=9, s=9, n=4, kv=4, h=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, n, h)), jax.random.normal(ks[1], (b, s, kv, h)),
          jax.random.normal(ks[2], (b, s, kv, h)))


def _reference(q, k, v, mask=None, causal=False, scale=None):
  """softmax(scale·QKᵀ)V written out in numpy-style jnp (float32, HIGHEST precision)."""
  n, kv = q.shape[2], k.shape[2]
  k, v = jnp.repeat(k, n // kv, axis=2), jnp.repeat(v, n // kv, axis=2)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, precision="highest") * scale
  if causal:
    logits = jnp.where(jnp.tril(jnp.ones(logits.shape[-2:], bool)), logits, -1e30)
  if mask is not None:
    logits = jnp.where(mask, logits, -1e30)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), v, precision="highest")


def _random_mask(b, t, s, seed=3):
  mask = jax.random.bernoulli(jax.random.key(seed), 0.6, (b, 1, t, s))
  return mask.at[..., 0].set(True)  # no fully masked row


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "mask": dict(mask=True),
    "gqa_causal_scaled": dict(kv=2, causal=True, scale=0.3),
    "cross": dict(t=1, s=9),  # the MAP head's single probe
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_impls_equal_the_reference_values_and_gradients(case):
  c = dict(CASES[case])
  shape = {k: c.pop(k) for k in ("t", "s", "kv") if k in c}
  q, k, v = _qkv(**shape)
  if c.pop("mask", False):
    c["mask"] = _random_mask(q.shape[0], q.shape[1], k.shape[1])
  weights = jax.random.normal(jax.random.key(9), q.shape)
  fns = {"reference": lambda q, k, v: _reference(q, k, v, **c)}
  for impl, chunk in (("xla", 0), ("chunked", 0), ("chunked", 4)):
    fns[f"{impl}{chunk}"] = lambda q, k, v, impl=impl, chunk=chunk: A.attend(
        q, k, v, impl=impl, chunk=chunk, **c)

  @jax.jit
  def values_and_grads(q, k, v):
    return {name: jax.value_and_grad(lambda *a, f=f: jnp.sum(f(*a) * weights), (0, 1, 2))(q, k, v)
            for name, f in fns.items()}

  out = values_and_grads(q, k, v)
  ref = out.pop("reference")
  for name, got in out.items():
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, err_msg=name, **TOL), got, ref)
  np.testing.assert_allclose(A.attend(q, k, v, impl="xla", **c), fns["reference"](q, k, v), **TOL)


def test_pallas_tpu_flash_kernel_in_interpret_mode():
  """The TPU kernel (sequences padded 20 -> 128, padding in its own segment) in the interpreter:
  causal values and gradients, then a random mask through the kernel's bias input."""
  q, k, v = _qkv(b=1, t=20, s=20, n=2, kv=1, h=8)
  weights = jax.random.normal(jax.random.key(9), q.shape)
  pallas = lambda q, k, v: A.attend(q, k, v, impl="pallas_tpu", causal=True, interpret=True)
  ref = lambda q, k, v: _reference(q, k, v, causal=True)
  np.testing.assert_allclose(pallas(q, k, v), ref(q, k, v), **TOL)
  grads = jax.grad(lambda *a: jnp.sum(pallas(*a) * weights), (0, 1, 2))(q, k, v)
  expected = jax.grad(lambda *a: jnp.sum(ref(*a) * weights), (0, 1, 2))(q, k, v)
  for g, r in zip(grads, expected):
    np.testing.assert_allclose(g, r, **TOL)
  mask = _random_mask(1, 20, 20)
  np.testing.assert_allclose(A.attend(q, k, v, impl="pallas_tpu", mask=mask, interpret=True),
                             _reference(q, k, v, mask=mask), **TOL)


def test_backend_checks_name_the_field():
  if jax.default_backend() != "gpu":
    with pytest.raises(ConfigError, match=r"model.attention_impl='cudnn' needs a GPU"):
      A.attend(*_qkv(), impl="cudnn")
  if jax.default_backend() != "tpu":
    with pytest.raises(ConfigError, match=r"llm.attention_impl='pallas_tpu' needs a TPU"):
      A.attend(*_qkv(), impl="pallas_tpu", field="llm.attention_impl")
  with pytest.raises(ConfigError, match=r"attention_impl must be one of .*'flash'"):
    A.check_impl("flash")


def test_config_validators_reject_unknown_impls():
  config = mc.tokenizer_config(
      vision=mc.vit_config("Ti", 16), image_size=64, layer_recon=1, layer_sem=2,
      vq_pix=mc.quantizer_config(), vq_sem=mc.quantizer_config(),
      decoder=mc.decoder_config(ch=32, ch_mult=(1,) * 5, attn_resolutions=(), in_channels=64))
  mc.validate(config)
  assert config.attention_impl == "chunked" and config.nearest_code_impl == "xla"
  for field, value in (("attention_impl", "flash"), ("nearest_code_impl", "triton")):
    bad = config.copy_and_resolve_references()
    bad[field] = value
    with pytest.raises(ConfigError, match=rf"{field} must be one of .*{value!r}"):
      mc.validate(bad)
  with pytest.raises(ConfigError, match="attention_impl must be one of"):
    llm_config.get_config("tiny_qwen2", attention_impl="flash")
  with pytest.raises(ConfigError, match="no logit soft-capping"):
    llm_config.get_config("tiny", attention_impl="xla")  # tiny Gemma 3 soft-caps its logits


def _grads_equal(apply, params, x, impls):
  outs = jax.jit(lambda params, x: {
      i: jax.value_and_grad(lambda p, i=i: jnp.sum(jnp.sin(apply(i, p, x))))(params)
      for i in impls})(params, x)
  (v0, g0), *rest = outs.values()
  for v, g in rest:
    np.testing.assert_allclose(v, v0, **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), g, g0)


def test_vision_tower_impls_agree():
  make = lambda impl: VisionTower(patch_size=4, grid=4, width=32, depth=1, mlp_dim=64,
                                  num_heads=4, attention_impl=impl)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  params = make("chunked").init(jax.random.key(0), x)["params"]
  assert jax.tree.structure(params) == jax.tree.structure(
      make("xla").init(jax.random.key(0), x)["params"])  # the parameter tree does not change
  _grads_equal(lambda i, p, x: make(i).apply({"params": p}, x), params, x, ("chunked", "xla"))


@pytest.mark.parametrize("causal,out_dim", [(False, 8), (True, 32)])
def test_projection_impls_agree(causal, out_dim):
  make = lambda impl: AttnProjection(out_dim, num_heads=4, causal=causal, attention_impl=impl)
  x = jax.random.normal(jax.random.key(1), (2, 10, 32 if out_dim == 8 else 8))
  params = make("chunked").init(jax.random.key(0), x)["params"]
  _grads_equal(lambda i, p, x: make(i).apply({"params": p}, x), params, x, ("chunked", "xla"))


def test_decoder_llm_impls_agree():
  """tiny_qwen2 (grouped-query, no soft-cap): the decoder's einsum attention vs jax.nn's."""
  base = DecoderLM.init(llm_config.get_config("tiny_qwen2"), seed=0)
  xla = DecoderLM(llm_config.get_config("tiny_qwen2", attention_impl="xla"), base.params)
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 128)
  mask = jnp.ones((2, 12), bool).at[1, 9:].set(False)  # right padding
  a, b = np.asarray(base.logits(tokens, mask)), np.asarray(xla.logits(tokens, mask))
  np.testing.assert_allclose(b[0], a[0], **TOL)
  np.testing.assert_allclose(b[1, :9], a[1, :9], **TOL)
