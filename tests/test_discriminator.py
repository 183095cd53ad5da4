"""PatchGAN discriminator: size, init, one DResBlock against numpy, the whole net against PyTorch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import FIXTURES
from dualtoken_jax.models.discriminator import DResBlock, PatchDiscriminator

GOLDEN = FIXTURES / "losses" / "golden.npz"


# --------------------------------------------------------------------------- numpy reference (NHWC)
def np_group_norm(x, scale, bias, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h * w, groups, c // groups)
  g = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + eps)
  return g.reshape(b, h, w, c) * scale + bias


def np_conv(x, kernel, bias, stride, pad):
  """PyTorch Conv2d semantics: zero padding `pad` on every side, then a strided cross-correlation."""
  kh, kw = kernel.shape[:2]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  oh = (xp.shape[1] - kh) // stride + 1
  ow = (xp.shape[2] - kw) // stride + 1
  out = np.zeros(x.shape[:1] + (oh, ow, kernel.shape[3])) + bias
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
      out += patch @ kernel[i, j]
  return out


def torch_bilinear_matrix(n_in, n_out):
  """Rows of F.interpolate(mode='bilinear', align_corners=False) along one axis (ATen's formula)."""
  m = np.zeros((n_out, n_in))
  for o in range(n_out):
    src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = int(math.floor(src))
    i1 = min(i0 + 1, n_in - 1)
    m[o, i0] += 1 - (src - i0)
    m[o, i1] += src - i0
  return m


def np_dresblock(p, x, stride):
  h = np_group_norm(x, p["norm1"]["scale"], p["norm1"]["bias"])
  h = np.where(h > 0, h, 0.2 * h)
  h = np_conv(h, p["conv1"]["kernel"], p["conv1"]["bias"], stride, 1)
  if h.shape[1:3] != x.shape[1:3]:
    x = np.einsum("oh,pw,bhwc->bopc", torch_bilinear_matrix(x.shape[1], h.shape[1]),
                  torch_bilinear_matrix(x.shape[2], h.shape[2]), x)
  if "nin_shortcut" in p:
    x = np_conv(x, p["nin_shortcut"]["kernel"], p["nin_shortcut"]["bias"], 1, 0)
  return x + h


def test_bilinear_matrix_is_torch():
  """Spot values of F.interpolate(arange(5), size=3 / 8, bilinear, align_corners=False)."""
  np.testing.assert_allclose(torch_bilinear_matrix(5, 3) @ np.arange(5.0), [0.3333333, 2.0, 3.6666667], rtol=1e-6)
  np.testing.assert_allclose(torch_bilinear_matrix(5, 8) @ np.arange(5.0),
                             [0.0, 0.4375, 1.0625, 1.6875, 2.3125, 2.9375, 3.5625, 4.0], rtol=1e-6)


# Even sizes catch 'SAME' padding (it pads a stride-2 3×3 conv (0, 1)); odd ones make the shortcut
# resize by a non-integer factor (11 -> 6, 13 -> 7).
@pytest.mark.parametrize("shape, stride", [((2, 12, 12, 32), 2), ((2, 11, 13, 32), 2), ((2, 5, 5, 32), 1)])
def test_dresblock_matches_numpy(shape, stride):
  x = np.random.RandomState(0).standard_normal(shape).astype(np.float32)
  block = DResBlock(64, stride)
  rs = np.random.RandomState(1)
  normal = lambda *s, scale=1.0: (scale * rs.standard_normal(s)).astype(np.float32)
  params = {"norm1": {"scale": 1 + normal(32, scale=0.2), "bias": normal(32, scale=0.2)},  # not 1/0:
            "conv1": {"kernel": normal(3, 3, 32, 64, scale=0.06), "bias": normal(64, scale=0.1)},  # a swap shows
            "nin_shortcut": {"kernel": normal(1, 1, 32, 64, scale=0.2), "bias": normal(64, scale=0.1)}}
  init_shapes = jax.eval_shape(block.init, jax.random.key(0), jnp.asarray(x))["params"]
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda a: a.shape, init_shapes)
  got = np.asarray(jax.jit(block.apply)({"params": params}, jnp.asarray(x)))
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = np_dresblock(p64, x.astype(np.float64), stride)
  assert got.shape == want.shape == (shape[0], -(-shape[1] // stride), -(-shape[2] // stride), 64)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- the whole network
def test_size_at_384():
  model = PatchDiscriminator(ndf=64)
  x = jax.ShapeDtypeStruct((2, 384, 384, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(variables))
  assert n_params == 1_729_409  # ≈ 1.73 M, spec B.3
  out = jax.eval_shape(model.apply, variables, x)
  assert out.shape == (2, 48, 48, 1) and out.dtype == jnp.float32


def test_bf16_compute_returns_float32_logits():
  model = PatchDiscriminator(ndf=32, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  out = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(0), x), x)
  assert out.dtype == jnp.float32 and out.shape == (1, 8, 8, 1)


def test_init_matches_reference():
  """Conv weights N(0, 0.02); biases PyTorch's U(±1/√fan_in); GroupNorm ones and zeros."""
  # One stride-1 block at ndf 32: the same init code as the full net, a fraction of the compile time.
  model = PatchDiscriminator(ndf=32, n_layers=1)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  kernel = flat["block_0/conv1/kernel"]  # 18 432 samples: the std's standard error is 1e-4
  assert abs(kernel.std() - 0.02) < 5e-4 and abs(kernel.mean()) < 5e-4
  for name, fan_in in (("conv_in", 27), ("block_0/conv1", 32 * 9), ("block_0/nin_shortcut", 32)):
    b, bound = flat[f"{name}/bias"], 1 / math.sqrt(fan_in)
    assert np.abs(b).max() <= bound and np.abs(b).max() > 0.8 * bound, name
  np.testing.assert_array_equal(flat["block_0/norm1/scale"], 1.0)
  np.testing.assert_array_equal(flat["block_0/norm1/bias"], 0.0)


def test_rejects_ndf_not_multiple_of_32():
  with pytest.raises(ValueError, match="multiple of 32"):
    PatchDiscriminator(ndf=48).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def _flax_path(torch_key):
  """The reference's `main.{i}[.sub].{weight,bias}` -> our '/'-joined parameter path."""
  parts = torch_key.split(".")
  top = {0: "conv_in", 2: "block_0", 3: "block_1", 4: "block_2", 5: "conv_out"}[int(parts[1])]
  leaf = "bias" if parts[-1] == "bias" else ("scale" if parts[-2:-1] == ["norm1"] else "kernel")
  return "/".join([top] + parts[2:-1] + [leaf])


def test_matches_torch_golden():
  """The network written in PyTorch from the spec (make_goldens.py), float64, on seeded weights."""
  golden = np.load(GOLDEN)
  x = np.random.RandomState(3).uniform(-1, 1, (2, 3, 44, 44)).astype(np.float32)
  np.testing.assert_allclose(x.astype(np.float64).sum(), golden["disc_x_sum"], rtol=1e-12)
  model = PatchDiscriminator(ndf=32)
  x = jnp.asarray(np.transpose(x, (0, 2, 3, 1)))
  shapes = traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0), x)["params"], sep="/")
  flat = {}
  for i, key in enumerate(golden["disc_keys"]):  # same seeds and rules as make_goldens.py
    path = _flax_path(str(key))
    shape = shapes[path].shape
    torch_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
    rs = np.random.RandomState(200 + i)
    if "norm1" in path:
      a = (1.0 if path.endswith("scale") else 0.0) + 0.1 * rs.standard_normal(torch_shape)
    elif path.endswith("kernel"):
      a = rs.standard_normal(torch_shape) / np.sqrt(np.prod(torch_shape[1:]))
    else:
      a = 0.05 * rs.standard_normal(torch_shape)
    a = a.astype(np.float32)
    flat[path] = np.transpose(a, (2, 3, 1, 0)) if len(shape) == 4 else a
  assert set(flat) == set(shapes)
  got = model.apply({"params": traverse_util.unflatten_dict(flat, sep="/")}, x)
  want = np.transpose(golden["disc_logits"], (0, 2, 3, 1))
  assert got.shape == want.shape == (2, 6, 6, 1)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
