"""The jitted training step: equal on every mesh, frozen parts untouched, non-finite steps
skipped, LPIPS and GAN terms wired in."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualtoken_jax import config_files, data
from dualtoken_jax.training.state import state_layout

from dualtoken_jax.parallel import sharding
from dualtoken_jax.bridges import layout
from dualtoken_jax.models import lpips as lpips_model
from dualtoken_jax.tokenizer_training import state as S
from dualtoken_jax.tokenizer_training.step import make_train_step


SIZE = 32  # configs/demo_cpu.py:test


def demo_config(stage=1, scan=False):
  config = config_files.load("configs/demo_cpu.py:test")
  if stage != 1:
    from dualtoken_jax.tokenizer_training import recipe  # pylint: disable=g-import-not-at-top
    config = recipe.training_config(config.model, stage=stage, batch_size=8, total_steps=10,
                                    steps_per_epoch=5)
  config.model.scan_layers = scan
  config.gan.start_step = 0
  # Adam's first update is ~lr·sign(g): where a gradient entry is ~0, reduction order can flip
  # its sign across meshes. A small first-step lr keeps such flips below the 1e-5 tolerance.
  config.optimizer.lr = 1e-4
  return config


@pytest.fixture(scope="module")
def images():
  return jax.random.uniform(jax.random.key(7), (8, SIZE, SIZE, 3), minval=-1, maxval=1)


@pytest.fixture(scope="module")
def lpips():
  params = lpips_model.LPIPS().init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 3)))
  return lpips_model.lpips_fn(params["params"])


_COMPILED, _INITIAL = {}, {}


def initial_state(config, modules):
  """The fresh state of `config`, created once (single device) and reused by every test."""
  key = config.to_json()
  if key not in _INITIAL:
    mesh = sharding.single_device_mesh()
    _INITIAL[key] = jax.device_get(modules.create(mesh, state_layout(modules, mesh).shardings))
  return _INITIAL[key]


def run_step(config, images, mesh_shape, lpips=None, with_gan=True, steps=1):
  """The fresh state placed on `mesh_shape`, then `steps` steps on `images`."""
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)), devices)
  modules = S.Modules(config)
  shardings = state_layout(modules, mesh).shardings
  state = jax.device_put(initial_state(config, modules), shardings)
  batch = data.batch_sharding(mesh)
  key = (config.to_json(), mesh_shape, lpips is not None, with_gan)
  if key not in _COMPILED:
    _COMPILED[key] = jax.jit(make_train_step(modules, lpips, with_gan),
                             in_shardings=(shardings, batch), out_shardings=(shardings, None))
  step = _COMPILED[key]
  first = state
  for _ in range(steps):
    state, metrics = step(state, jax.device_put(images, batch))
  return first, state, jax.device_get(metrics), shardings


@pytest.fixture(scope="module")
def single(images):
  return run_step(demo_config(), images, (1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 8, 1), (8, 1, 1)])
def test_sharded_step_equals_single_device(single, images, mesh_shape):
  """GAN on (discriminator step and adaptive weight included); LPIPS is covered below."""
  _, ref, ref_metrics, _ = single
  _, state, metrics, shardings = run_step(demo_config(), images, mesh_shape)
  if mesh_shape[1] == 8:  # FSDP really shards something big enough
    specs = [s.spec for s in jax.tree.leaves(shardings.params)]
    assert any("fsdp" in str(spec) for spec in specs)
  for key in ("loss/total", "loss/mse", "loss/generator", "loss/discriminator", "grad_norm"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # λ is a ratio of two gradient norms: reduction order moves it a little more.
  np.testing.assert_allclose(metrics["gan/adaptive_weight"], ref_metrics["gan/adaptive_weight"], rtol=1e-4)
  for name in ("params", "vq_stats", "disc_params"):
    for x, y in zip(jax.tree.leaves(getattr(state, name)), jax.tree.leaves(getattr(ref, name))):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5, err_msg=name)
  # Adam's moments hold raw gradients: sums over the batch split across devices differ in the
  # last bits, which large conv-kernel reductions amplify to ~1e-5 absolute.
  for x, y in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(ref.opt_state)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-4)


def test_step_trains_and_updates_codebooks(images, lpips):
  # Two steps: the discriminator's schedule warms up from lr 0, as the reference's does.
  first, state, metrics, _ = run_step(demo_config(), images, (1, 1, 1), lpips, steps=2)
  assert metrics["finite"] == 1.0
  assert metrics["loss/lpips"] > 0 and 0.3 <= metrics["gan/adaptive_weight"] <= 10.0
  assert not np.allclose(state.params["decoder"]["conv_out"]["kernel"], first.params["decoder"]["conv_out"]["kernel"])
  assert not np.allclose(state.vq_stats["quantizer_pix"]["codebook"], first.vq_stats["quantizer_pix"]["codebook"])
  assert not np.allclose(state.disc_params["conv_out"]["kernel"], first.disc_params["conv_out"]["kernel"])
  np.testing.assert_array_equal(state.teacher["embedding"]["kernel"], first.teacher["embedding"]["kernel"])
  assert int(state.step) == 2


@pytest.mark.parametrize("stage,scan", [(0, True), (2, False)])
def test_stage_freezing_in_a_real_step(images, stage, scan):
  config = demo_config(stage=stage, scan=scan)
  first, state, metrics, _ = run_step(config, images, (1, 1, 1), with_gan=False, steps=2)
  assert metrics["finite"] == 1.0
  before = layout.to_loop(layout.flatten({"params": layout.to_host(first.params)}))
  after = layout.to_loop(layout.flatten({"params": layout.to_host(state.params)}))
  import re  # pylint: disable=g-import-not-at-top
  frozen = [re.compile(p) for p in config.frozen]
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  for k in before:
    path = k[len("params/"):]
    if any(r.fullmatch(path) for r in frozen):
      assert k not in changed, f"frozen {k} changed"
  assert changed, "nothing trained"
  codebook_changed = not np.array_equal(first.vq_stats["quantizer_pix"]["codebook"],
                                        state.vq_stats["quantizer_pix"]["codebook"])
  assert codebook_changed == (stage != 2)  # stage 2 keeps the pixel codebook fixed


def test_non_finite_step_changes_nothing(images):
  config = demo_config()
  bad = images.at[0, 0, 0, 0].set(jnp.nan)
  first, state, metrics, _ = run_step(config, bad, (1, 1, 1), with_gan=True)
  assert metrics["finite"] == 0.0
  for name in ("params", "vq_stats", "opt_state", "disc_params"):
    for x, y in zip(jax.tree.leaves(getattr(state, name)), jax.tree.leaves(getattr(first, name))):
      np.testing.assert_array_equal(x, y)
  assert int(state.step) == 1
