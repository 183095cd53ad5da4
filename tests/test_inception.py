"""FID Inception: pytorch-fid key layout, the converter CLI, and parity with a numpy reference.

The layout table and the numpy forward pass below are written independently of the Flax module
(from torchvision's Inception3 constructor arguments and pytorch-fid's FIDInception* blocks), in
float64, so a wrong kernel size, padding, branch order or pooling quirk shows up as a mismatch.
"""

import importlib.util
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from dualtoken_jax import convert_inception
from dualtoken_jax.bridges import inception as inception_weights
from dualtoken_jax.bridges import layout
from dualtoken_jax.bridges import rules as R
from dualtoken_jax.bridges.tensor_files import CheckpointError, write_safetensors
from dualtoken_jax.models import inception

BN_EPS = 1e-3


# ---------------------------------------------------------------- pytorch-fid layout (independent)
def _a(n, cin, pool):
  return [(f"{n}.branch1x1", cin, 64, (1, 1)), (f"{n}.branch5x5_1", cin, 48, (1, 1)),
          (f"{n}.branch5x5_2", 48, 64, (5, 5)), (f"{n}.branch3x3dbl_1", cin, 64, (1, 1)),
          (f"{n}.branch3x3dbl_2", 64, 96, (3, 3)), (f"{n}.branch3x3dbl_3", 96, 96, (3, 3)),
          (f"{n}.branch_pool", cin, pool, (1, 1))]


def _c(n, c7):
  return [(f"{n}.branch1x1", 768, 192, (1, 1)), (f"{n}.branch7x7_1", 768, c7, (1, 1)),
          (f"{n}.branch7x7_2", c7, c7, (1, 7)), (f"{n}.branch7x7_3", c7, 192, (7, 1)),
          (f"{n}.branch7x7dbl_1", 768, c7, (1, 1)), (f"{n}.branch7x7dbl_2", c7, c7, (7, 1)),
          (f"{n}.branch7x7dbl_3", c7, c7, (1, 7)), (f"{n}.branch7x7dbl_4", c7, c7, (7, 1)),
          (f"{n}.branch7x7dbl_5", c7, 192, (1, 7)), (f"{n}.branch_pool", 768, 192, (1, 1))]


def _e(n, cin):
  return [(f"{n}.branch1x1", cin, 320, (1, 1)), (f"{n}.branch3x3_1", cin, 384, (1, 1)),
          (f"{n}.branch3x3_2a", 384, 384, (1, 3)), (f"{n}.branch3x3_2b", 384, 384, (3, 1)),
          (f"{n}.branch3x3dbl_1", cin, 448, (1, 1)), (f"{n}.branch3x3dbl_2", 448, 384, (3, 3)),
          (f"{n}.branch3x3dbl_3a", 384, 384, (1, 3)), (f"{n}.branch3x3dbl_3b", 384, 384, (3, 1)),
          (f"{n}.branch_pool", cin, 192, (1, 1))]


def _b(n, cin):
  return [(f"{n}.branch3x3", cin, 384, (3, 3)), (f"{n}.branch3x3dbl_1", cin, 64, (1, 1)),
          (f"{n}.branch3x3dbl_2", 64, 96, (3, 3)), (f"{n}.branch3x3dbl_3", 96, 96, (3, 3))]


def _d(n, cin):
  return [(f"{n}.branch3x3_1", cin, 192, (1, 1)), (f"{n}.branch3x3_2", 192, 320, (3, 3)),
          (f"{n}.branch7x7x3_1", cin, 192, (1, 1)), (f"{n}.branch7x7x3_2", 192, 192, (1, 7)),
          (f"{n}.branch7x7x3_3", 192, 192, (7, 1)), (f"{n}.branch7x7x3_4", 192, 192, (3, 3))]


LAYOUT = ([("Conv2d_1a_3x3", 3, 32, (3, 3)), ("Conv2d_2a_3x3", 32, 32, (3, 3)),
           ("Conv2d_2b_3x3", 32, 64, (3, 3)), ("Conv2d_3b_1x1", 64, 80, (1, 1)),
           ("Conv2d_4a_3x3", 80, 192, (3, 3))]
          + _a("Mixed_5b", 192, 32) + _a("Mixed_5c", 256, 64) + _a("Mixed_5d", 288, 64)
          + _b("Mixed_6a", 288)
          + _c("Mixed_6b", 128) + _c("Mixed_6c", 160) + _c("Mixed_6d", 160) + _c("Mixed_6e", 192)
          + _d("Mixed_7a", 768)
          + _e("Mixed_7b", 1280) + _e("Mixed_7c", 2048))


def random_state_dict(seed=0):
  """Random weights in the exact key layout of pt_inception-2015-12-05-6726825d.pth."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, cin, cout, (kh, kw) in LAYOUT:
    fan_in = cin * kh * kw
    sd[f"{name}.conv.weight"] = (rng.standard_normal((cout, cin, kh, kw), np.float32)
                                 * np.float32(np.sqrt(2.0 / fan_in)))
    sd[f"{name}.bn.weight"] = rng.uniform(0.6, 1.4, cout).astype(np.float32)
    sd[f"{name}.bn.bias"] = rng.normal(0.0, 0.2, cout).astype(np.float32)
    sd[f"{name}.bn.running_mean"] = rng.normal(0.0, 0.2, cout).astype(np.float32)
    sd[f"{name}.bn.running_var"] = rng.uniform(0.5, 2.0, cout).astype(np.float32)
    sd[f"{name}.bn.num_batches_tracked"] = np.array(0, np.int64)
  sd["fc.weight"] = rng.standard_normal((1008, 2048), np.float32) * 0.01
  sd["fc.bias"] = np.zeros(1008, np.float32)
  return sd


# ---------------------------------------------------------------- numpy float64 reference
def np_conv_bn_relu(sd, name, x, stride=1, pad=(0, 0)):
  w = sd[f"{name}.conv.weight"].astype(np.float64)
  kh, kw = w.shape[2:]
  x = np.pad(x, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
  win = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # (B,H,W,C,kh,kw)
  y = np.einsum("bhwcij,ocij->bhwo", win, w, optimize=True)
  g = lambda k: sd[f"{name}.bn.{k}"].astype(np.float64)
  y = (y - g("running_mean")) / np.sqrt(g("running_var") + BN_EPS) * g("weight") + g("bias")
  return np.maximum(y, 0.0)


def np_max_pool(x, stride, pad=0):
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
  return sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::stride, ::stride].max(axis=(-2, -1))


def np_avg_pool(x, count_include_pad=False):
  """3x3/1, padding 1; PyTorch's avg_pool2d with the given count_include_pad."""
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  s = sliding_window_view(xp, (3, 3), axis=(1, 2)).sum(axis=(-2, -1))
  if count_include_pad:
    return s / 9.0
  ones = np.pad(np.ones(x.shape[1:3]), 1)
  return s / sliding_window_view(ones, (3, 3)).sum(axis=(-2, -1))[None, :, :, None]


def np_block_a(sd, n, x, count_include_pad=False):
  c = lambda m, v, **k: np_conv_bn_relu(sd, f"{n}.{m}", v, **k)
  b5 = c("branch5x5_2", c("branch5x5_1", x), pad=(2, 2))
  b3 = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x), pad=(1, 1)), pad=(1, 1))
  bp = c("branch_pool", np_avg_pool(x, count_include_pad))
  return np.concatenate([c("branch1x1", x), b5, b3, bp], axis=-1)


def np_block_b(sd, n, x):
  c = lambda m, v, **k: np_conv_bn_relu(sd, f"{n}.{m}", v, **k)
  bd = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x), pad=(1, 1)), stride=2)
  return np.concatenate([c("branch3x3", x, stride=2), bd, np_max_pool(x, 2)], axis=-1)


def np_block_c(sd, n, x):
  c = lambda m, v, **k: np_conv_bn_relu(sd, f"{n}.{m}", v, **k)
  row, col = (0, 3), (3, 0)
  b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x), pad=row), pad=col)
  bd = c("branch7x7dbl_1", x)
  for i, p in zip(range(2, 6), (col, row, col, row)):
    bd = c(f"branch7x7dbl_{i}", bd, pad=p)
  return np.concatenate([c("branch1x1", x), b7, bd, c("branch_pool", np_avg_pool(x))], axis=-1)


def np_block_d(sd, n, x):
  c = lambda m, v, **k: np_conv_bn_relu(sd, f"{n}.{m}", v, **k)
  b3 = c("branch3x3_2", c("branch3x3_1", x), stride=2)
  b7 = c("branch7x7x3_3", c("branch7x7x3_2", c("branch7x7x3_1", x), pad=(0, 3)), pad=(3, 0))
  b7 = c("branch7x7x3_4", b7, stride=2)
  return np.concatenate([b3, b7, np_max_pool(x, 2)], axis=-1)


def np_block_e(sd, n, x, pool):
  c = lambda m, v, **k: np_conv_bn_relu(sd, f"{n}.{m}", v, **k)
  split = lambda a, b, v: np.concatenate([c(a, v, pad=(0, 1)), c(b, v, pad=(1, 0))], axis=-1)
  b3 = split("branch3x3_2a", "branch3x3_2b", c("branch3x3_1", x))
  bd = c("branch3x3dbl_2", c("branch3x3dbl_1", x), pad=(1, 1))
  bd = split("branch3x3dbl_3a", "branch3x3dbl_3b", bd)
  pooled = np_max_pool(x, 1, pad=1) if pool == "max" else np_avg_pool(x)
  return np.concatenate([c("branch1x1", x), b3, bd, c("branch_pool", pooled)], axis=-1)


def np_inception(sd, images):
  """pytorch-fid InceptionV3([3]) on [0, 1] images that are already the size to use."""
  x = 2.0 * images.astype(np.float64) - 1.0
  c = lambda m, v, **k: np_conv_bn_relu(sd, m, v, **k)
  x = c("Conv2d_2b_3x3", c("Conv2d_2a_3x3", c("Conv2d_1a_3x3", x, stride=2)), pad=(1, 1))
  x = np_max_pool(c("Conv2d_4a_3x3", c("Conv2d_3b_1x1", np_max_pool(x, 2))), 2)
  for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = np_block_a(sd, n, x)
  x = np_block_b(sd, "Mixed_6a", x)
  for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x = np_block_c(sd, n, x)
  x = np_block_d(sd, "Mixed_7a", x)
  x = np_block_e(sd, "Mixed_7b", x, "avg")
  x = np_block_e(sd, "Mixed_7c", x, "max")
  return x.mean(axis=(1, 2))


def np_resize_bilinear(x, out_h, out_w):
  """torch.nn.functional.interpolate(mode='bilinear', align_corners=False), NHWC."""
  def axis_weights(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0
  h0, h1, lh = axis_weights(x.shape[1], out_h)
  w0, w1, lw = axis_weights(x.shape[2], out_w)
  x = x[:, h0] * (1 - lh)[None, :, None, None] + x[:, h1] * lh[None, :, None, None]
  return x[:, :, w0] * (1 - lw)[None, None, :, None] + x[:, :, w1] * lw[None, None, :, None]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def state_dict():
  return random_state_dict()


@pytest.fixture(scope="module")
def converted(state_dict, tmp_path_factory):
  """The random state dict written as .safetensors and converted by the CLI entry point."""
  d = tmp_path_factory.mktemp("inception")
  src, dst = d / "pt_inception.safetensors", d / "inception_fid.npz"
  write_safetensors(src, state_dict)
  assert convert_inception.main(["--input", str(src), "--output", str(dst)]) == 0
  return dst


@pytest.fixture(scope="module")
def variables(converted):
  return inception_weights.load(converted)


def assert_close(actual, expected, rel=1e-4):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  scale = np.max(np.abs(expected))
  assert scale > 0
  err = np.max(np.abs(actual - expected))
  assert err <= rel * scale, f"max abs error {err:.3g} > {rel} * {scale:.3g}"


def _block_vars(variables, name):
  return {col: variables[col][name] for col in ("params", "batch_stats")}


# ---------------------------------------------------------------- tests
def test_variable_tree_is_pytorch_fid_layout_one_to_one():
  expected = inception.expected_shapes()
  assert len(expected) == 5 * len(LAYOUT) == 470
  for name, cin, cout, (kh, kw) in LAYOUT:
    m = name.replace(".", "/")
    assert expected[f"params/{m}/conv/kernel"] == (kh, kw, cin, cout)
    for leaf in ("params/{}/bn/scale", "params/{}/bn/bias", "batch_stats/{}/bn/mean",
                 "batch_stats/{}/bn/var"):
      assert expected[leaf.format(m)] == (cout,)


def test_converter_roundtrip_and_transpose(state_dict, variables):
  k = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
  torch_w = state_dict["Mixed_6b.branch7x7_2.conv.weight"]  # (O, I, kh, kw) = (160, 160, 1, 7)
  np.testing.assert_array_equal(np.asarray(k), torch_w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      np.asarray(variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"]),
      state_dict["Mixed_7c.branch_pool.bn.running_var"])
  back = R.export_tensors(layout.flatten(jax.device_get(variables)),
                          inception_weights.rules(inception.expected_shapes()))
  kept = {k: v for k, v in state_dict.items() if not inception_weights._ignored(k)}
  assert set(back) == set(kept)
  for key, v in kept.items():
    np.testing.assert_array_equal(back[key], v)


def test_converter_is_strict(state_dict):
  bad = dict(state_dict)
  del bad["Mixed_5b.branch_pool.bn.running_var"]
  bad["Mixed_5b.extra.conv.weight"] = np.zeros((1,), np.float32)
  bad["Mixed_7c.branch1x1.conv.weight"] = np.zeros((320, 2048, 3, 3), np.float32)
  with pytest.raises(CheckpointError) as e:
    inception_weights.convert(bad)
  assert e.value.missing == ["Mixed_5b.branch_pool.bn.running_var"]
  assert e.value.unexpected == ["Mixed_5b.extra.conv.weight"]
  assert any("Mixed_7c/branch1x1/conv/kernel" in m for m in e.value.misshaped)


def test_load_is_strict(converted, tmp_path):
  with np.load(converted) as f:
    flat = dict(f)
  del flat["params/Conv2d_1a_3x3/conv/kernel"]
  flat["params/Mixed_5b/branch1x1/bn/scale"] = np.zeros((3,), np.float32)
  flat["params/fc/kernel"] = np.zeros((2048, 1008), np.float32)
  np.savez(tmp_path / "bad.npz", **flat)
  with pytest.raises(CheckpointError) as e:
    inception_weights.load(tmp_path / "bad.npz")
  assert e.value.missing == ["params/Conv2d_1a_3x3/conv/kernel"]
  assert e.value.unexpected == ["params/fc/kernel"]
  assert len(e.value.misshaped) == 1 and "Mixed_5b/branch1x1/bn/scale" in e.value.misshaped[0]


def test_cli_runs_as_module_and_checks_the_input_format(tmp_path):
  src = tmp_path / "weights.ckpt"
  src.write_bytes(b"")
  proc = subprocess.run([sys.executable, "-m", "dualtoken_jax.convert_inception", "--input",
                         str(src), "--output", str(tmp_path / "out.npz")],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert ".pth/.pt (PyTorch) or .safetensors" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_pth_without_torch_says_so(tmp_path):
  src = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  src.write_bytes(b"not really a pickle")
  with pytest.raises(ImportError, match="torch"):
    convert_inception.main(["--input", str(src), "--output", str(tmp_path / "out.npz")])


def test_mixed_5b_block_matches_numpy(state_dict, variables):
  rng = np.random.default_rng(1)
  x = np.maximum(rng.standard_normal((2, 7, 9, 192)), 0).astype(np.float32)  # post-ReLU input
  block = inception.InceptionA(pool_features=32)
  out = jax.jit(block.apply)(_block_vars(variables, "Mixed_5b"), jnp.asarray(x))
  assert out.shape == (2, 7, 9, 256)
  ref = np_block_a(state_dict, "Mixed_5b", x.astype(np.float64))
  assert_close(out, ref)
  # The test can tell the FID quirk apart: torchvision's count_include_pad=True is far off.
  wrong = np_block_a(state_dict, "Mixed_5b", x.astype(np.float64), count_include_pad=True)
  assert np.max(np.abs(wrong - ref)) > 100 * 1e-4 * np.max(np.abs(ref))


@pytest.mark.parametrize("name,pool", [("Mixed_7b", "avg"), ("Mixed_7c", "max")])
def test_mixed_7_blocks_match_numpy(state_dict, variables, name, pool):
  cin = 1280 if name == "Mixed_7b" else 2048
  rng = np.random.default_rng(2)
  x = np.maximum(rng.standard_normal((1, 5, 6, cin)), 0).astype(np.float32)
  block = inception.InceptionE(pool=pool)
  out = jax.jit(block.apply)(_block_vars(variables, name), jnp.asarray(x))
  assert out.shape == (1, 5, 6, 2048)
  ref = np_block_e(state_dict, name, x.astype(np.float64), pool)
  assert_close(out, ref)
  other = np_block_e(state_dict, name, x.astype(np.float64), "max" if pool == "avg" else "avg")
  assert np.max(np.abs(other - ref)) > 100 * 1e-4 * np.max(np.abs(ref))


def test_full_network_matches_numpy(state_dict, variables):
  # 107 px keeps every stage spatial (Mixed_7b/7c run at 2x2, so pooling borders matter).
  rng = np.random.default_rng(3)
  images = rng.uniform(0, 1, (2, 107, 107, 3)).astype(np.float32)
  model = inception.FIDInceptionV3(resize_input=False)
  feats = jax.jit(model.apply)(variables, jnp.asarray(images))
  assert feats.shape == (2, 2048) and feats.dtype == jnp.float32
  assert_close(feats, np_inception(state_dict, images))


@pytest.mark.parametrize("shape", [(64, 80), (384, 384), (299, 299)])
def test_resize_matches_torch_bilinear(shape):
  x = np.random.default_rng(4).uniform(0, 1, (1, *shape, 3)).astype(np.float32)
  out = np.asarray(inception.resize_bilinear(jnp.asarray(x)))
  np.testing.assert_allclose(out, np_resize_bilinear(x.astype(np.float64), 299, 299), atol=1e-5)


def test_features_at_fid_resolution(variables):
  images = np.random.default_rng(5).uniform(0, 1, (2, 64, 80, 3)).astype(np.float32)
  feats = jax.jit(inception.FIDInceptionV3().apply)(variables, jnp.asarray(images))
  assert feats.shape == (2, inception.FEATURE_DIM)
  assert np.all(np.isfinite(feats)) and np.all(np.asarray(feats) >= 0)  # mean of ReLU outputs
  assert not np.allclose(feats[0], feats[1])


def test_rejects_bad_inputs(variables):
  model = inception.FIDInceptionV3()
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    model.apply(variables, jnp.zeros((1, 32, 32, 1)))
  with pytest.raises(ValueError, match="uint8"):
    model.apply(variables, jnp.zeros((1, 32, 32, 3), jnp.uint8))
