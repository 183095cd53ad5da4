"""LPIPS: the converter CLI, the loader, and the Flax model against numpy and PyTorch references.

Weights are seeded random ones written in the real torchvision / LPIPS key layout, so the whole
path .safetensors -> convert_lpips -> .npz -> bridges.lpips.load -> LPIPS is exercised.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import FIXTURES
from dualtoken_jax import convert_lpips
from dualtoken_jax.bridges import lpips as lpips_weights
from dualtoken_jax.bridges.tensor_files import CheckpointError, write_npz
from dualtoken_jax.models import lpips

GOLDEN = FIXTURES / "losses" / "golden.npz"
SHAPE = (2, 3, 36, 44)  # NCHW, as in make_goldens.py


# --------------------------------------------------------------------------- seeded weights/inputs
def torch_layout_weights():
  """The same seeded weights as tests/fixtures/losses/make_goldens.py, in torch layout (fresh
  dicts over shared, never mutated arrays)."""
  vgg, lin = _torch_layout_weights()
  return dict(vgg), dict(lin)


@functools.lru_cache(maxsize=1)
def _torch_layout_weights():
  vgg = {}
  for i, (idx, (c_in, c_out)) in enumerate(lpips.vgg16_conv_channels().items()):
    rs = np.random.RandomState(i)
    vgg[f"features.{idx}.weight"] = (rs.standard_normal((c_out, c_in, 3, 3))
                                     * np.sqrt(2.0 / (c_in * 9))).astype(np.float32)
    vgg[f"features.{idx}.bias"] = (rs.standard_normal(c_out) * 0.05).astype(np.float32)
  lin = {f"lin{k}.model.1.weight": np.abs(np.random.RandomState(100 + k).standard_normal((1, c, 1, 1))
                                          * 0.1).astype(np.float32)
         for k, c in enumerate(lpips.TAP_CHANNELS)}
  return vgg, lin


def inputs():
  x = np.random.RandomState(1).uniform(-1, 1, SHAPE).astype(np.float32)
  y = np.clip(x + 0.4 * np.random.RandomState(2).standard_normal(SHAPE).astype(np.float32), -1, 1)
  return x, y.astype(np.float32)


def nhwc(a):
  return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """(torch-layout vgg, lin, params loaded back through the CLI and bridges.lpips.load)."""
  d = tmp_path_factory.mktemp("lpips")
  vgg, lin = torch_layout_weights()
  classifier = {"classifier.0.weight": np.zeros((4, 2), np.float32), "classifier.6.bias": np.zeros(3, np.float32)}
  save_file({**vgg, **classifier}, str(d / "vgg16.safetensors"))
  save_file(lin, str(d / "vgg_lin.safetensors"))
  out = d / "lpips_vgg.npz"
  convert_lpips.main(["--vgg", str(d / "vgg16.safetensors"), "--lin", str(d / "vgg_lin.safetensors"),
                      "--output", str(out)])
  return vgg, lin, lpips_weights.load(out)


_distance = jax.jit(lambda params, x, y: lpips.LPIPS().apply({"params": params}, x, y))


@pytest.fixture(scope="module")
def golden_run(weights):
  """Σ LPIPS(x, y) through `lpips_fn` and its gradients w.r.t. (params, x), on the golden inputs."""
  _, _, params = weights
  x, y = map(nhwc, inputs())
  loss = lambda p, a: jnp.sum(lpips.lpips_fn(p)(a, y))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


# --------------------------------------------------------------------------- numpy reference (NCHW)
def np_conv3x3(x, w, b):
  """Cross-correlation, zero padding 1, x (B, C, H, W), w (O, C, 3, 3): explicit sum over taps."""
  _, _, h, wd = x.shape
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  out = np.broadcast_to(b[None, :, None, None], (x.shape[0], w.shape[0], h, wd)).copy()
  for i in range(3):
    for j in range(3):
      out += np.einsum("bchw,oc->bohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j], optimize=True)
  return out


def np_maxpool2(x):
  b, c, h, w = x.shape
  x = x[:, :, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def np_lpips(vgg, lin, x, y):
  """LPIPS in float64 straight from the definition, torch layouts throughout."""
  shift = np.array([-0.030, -0.088, -0.188])[None, :, None, None]
  scale = np.array([0.458, 0.448, 0.450])[None, :, None, None]

  def taps(img):
    h, out = (img.astype(np.float64) - shift) / scale, []
    for s, stage in enumerate(((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))):
      if s:
        h = np_maxpool2(h)
      for idx in stage:
        h = np.maximum(np_conv3x3(h, vgg[f"features.{idx}.weight"].astype(np.float64),
                                  vgg[f"features.{idx}.bias"].astype(np.float64)), 0)
      out.append(h)
    return out

  total = np.zeros(x.shape[0])
  for k, (fx, fy) in enumerate(zip(taps(x), taps(y))):
    nx = fx / (np.sqrt((fx ** 2).sum(1, keepdims=True)) + 1e-10)
    ny = fy / (np.sqrt((fy ** 2).sum(1, keepdims=True)) + 1e-10)
    w = lin[f"lin{k}.model.1.weight"][0, :, 0, 0].astype(np.float64)
    total += np.einsum("bchw,c->bhw", (nx - ny) ** 2, w).mean(axis=(1, 2))
  return total


# --------------------------------------------------------------------------- model
def test_matches_numpy_reference(weights):
  vgg, lin, params = weights
  x, y = inputs()
  want = np_lpips(vgg, lin, x, y)
  got = np.asarray(_distance(params, nhwc(x), nhwc(y)))
  assert got.shape == (2,) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=2e-4)


def test_matches_torch_golden(weights, golden_run):
  """Outputs and input gradients of richzhang's `lpips` package (float64) on the same weights/inputs."""
  _, _, params = weights
  golden = np.load(GOLDEN)
  x, y = inputs()
  # The inputs are regenerated, not stored: make sure they are the ones the golden saw.
  np.testing.assert_allclose(x.astype(np.float64).sum(), golden["lpips_x_sum"], rtol=1e-12)
  np.testing.assert_allclose(y.astype(np.float64).sum(), golden["lpips_y_sum"], rtol=1e-12)
  d, (_, grad) = golden_run
  np.testing.assert_allclose(np.asarray(_distance(params, nhwc(x), nhwc(y))), golden["lpips_distance"],
                             rtol=2e-4)
  np.testing.assert_allclose(float(d), golden["lpips_distance"].sum(), rtol=2e-4)
  want = np.transpose(golden["lpips_grad_x"], (0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(grad), want, atol=1e-4 * np.abs(want).max())


def test_zero_on_identical_images_and_symmetric(weights):
  _, _, params = weights
  x, y = map(nhwc, inputs())
  np.testing.assert_allclose(np.asarray(_distance(params, x, x)), 0.0, atol=1e-7)
  d_xy, d_yx = _distance(params, x, y), _distance(params, y, x)
  assert np.all(np.asarray(d_xy) > 1e-3)
  np.testing.assert_allclose(np.asarray(d_xy), np.asarray(d_yx), rtol=1e-5)


def test_lpips_fn_freezes_params(golden_run):
  _, (g_params, g_x) = golden_run
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(g_params))
  assert np.abs(np.asarray(g_x)).max() > 0.0


def test_normalize_channels_zero_vector_has_finite_gradient():
  f = jnp.array([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0]])
  np.testing.assert_allclose(np.asarray(lpips.normalize_channels(f)), [[0, 0, 0], [0.6, 0, 0.8]], rtol=1e-6)
  c = jnp.array([1.0, -2.0, 0.5])
  g = jax.grad(lambda a: jnp.sum(lpips.normalize_channels(a) * c))(f)
  assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_allclose(np.asarray(g[0]), np.asarray(c) / lpips.EPS, rtol=1e-6)  # d(f/eps)/df at 0


def test_rejects_bad_inputs():
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match="16"):
    lpips.LPIPS().init(jax.random.key(0), x, x)
  with pytest.raises(ValueError, match="one shape"):
    lpips.LPIPS().init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 20, 3)))


# --------------------------------------------------------------------------- converter and loader
def test_converter_layout():
  vgg, lin = torch_layout_weights()
  out = lpips_weights.convert(vgg, lin)
  assert {k: v.shape for k, v in out.items()} == lpips.param_shapes()
  w = vgg["features.5.weight"]  # (out=128, in=64, kh, kw)
  np.testing.assert_array_equal(out["vgg/conv5/kernel"][2, 0, 17, 99], w[99, 17, 2, 0])
  np.testing.assert_array_equal(out["lin3/kernel"][0, 0, :, 0], lin["lin3.model.1.weight"][0, :, 0, 0])


@pytest.mark.parametrize("edit, match", [
    (lambda v, l: v.pop("features.12.bias"), "missing keys:\n    features.12.bias"),
    (lambda v, l: v.update({"features.1.running_mean": np.zeros(64, np.float32)}), "features.1.running_mean"),
    (lambda v, l: v.update({"features.0.weight": np.zeros((64, 3, 5, 5), np.float32)}),
     r"features.0.weight: \(64, 3, 5, 5\), expected \(64, 3, 3, 3\)"),
    (lambda v, l: l.update({"lin2.model.1.weight": np.zeros((1, 128, 1, 1), np.float32)}), "lin2.model.1.weight"),
    (lambda v, l: l.update({"lins.0.model.1.weight": np.zeros((1, 64, 1, 1), np.float32)}), "unexpected keys"),
])
def test_converter_is_strict(edit, match):
  vgg, lin = torch_layout_weights()
  edit(vgg, lin)
  with pytest.raises(CheckpointError, match=match):
    lpips_weights.convert(vgg, lin)


def test_converter_cli_rejects_non_npz_output(tmp_path):
  with pytest.raises(SystemExit):
    convert_lpips.main(["--vgg", "a.pth", "--lin", "b.pth", "--output", str(tmp_path / "out.safetensors")])


def test_pth_without_torch_says_so(tmp_path):
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    pytest.skip("torch is installed here")
  except ImportError:
    pass
  (tmp_path / "vgg.pth").write_bytes(b"not read")
  with pytest.raises(ImportError, match="torch"):
    convert_lpips.main(["--vgg", str(tmp_path / "vgg.pth"), "--lin", str(tmp_path / "vgg.pth"),
                        "--output", str(tmp_path / "o.npz")])


def test_load_lpips_without_path_explains():
  for path in (None, ""):
    with pytest.raises(ValueError, match="convert_lpips"):
      lpips_weights.load(path)


def test_load_lpips_is_strict(tmp_path):
  arrays = {k: np.zeros(s, np.float32) for k, s in lpips.param_shapes().items()}
  del arrays["lin4/kernel"]
  arrays["vgg/conv0/kernel"] = np.zeros((3, 3, 3, 32), np.float32)
  write_npz(tmp_path / "bad.npz", arrays)
  with pytest.raises(CheckpointError) as e:
    lpips_weights.load(tmp_path / "bad.npz")
  assert e.value.missing == ["lin4/kernel"]
  assert e.value.misshaped == ["vgg/conv0/kernel: (3, 3, 3, 32), expected (3, 3, 3, 64)"]
