"""Training recipe pieces: schedules, weight-decay mask, freezing by regex (loop and scan
layouts) and the stage configs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dualtoken_jax import config_files
from dualtoken_jax.models.dualtoken import init_variables
from dualtoken_jax.training import optimizer as O
from dualtoken_jax.tokenizer_training import recipe


def test_generator_schedule_matches_reference_formula():
  lr, warmup, total = 7.2e-5, 100, 1000
  schedule = O.warmup_cosine(lr, warmup, total)
  for step in (0, 1, 50, 99):
    np.testing.assert_allclose(schedule(step), lr * (step + 1) / warmup, rtol=1e-6)
  for step in (100, 400, 999):
    e, es = step - warmup, total - warmup
    np.testing.assert_allclose(schedule(step), 0.5 * (1 + np.cos(np.pi * e / es)) * lr, rtol=1e-5, atol=1e-12)


def test_discriminator_schedule_warms_up_from_zero_to_eta_min():
  schedule = O.warmup_cosine(7.2e-5, 10, 110, end_lr=4e-5, warmup_from_zero=True)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(schedule(10), 7.2e-5, rtol=1e-6)
  np.testing.assert_allclose(schedule(110), 4e-5, rtol=1e-5)


def test_decay_mask_uses_per_block_rank():
  params = {"img": {"Transformer": {"encoderblock": {"Dense_0": {"kernel": jnp.zeros((4, 8, 8)),
                                                                 "bias": jnp.zeros((4, 8))}}},
                    "pos_embedding": jnp.zeros((1, 9, 8))},
            "decoder": {"conv_out": {"kernel": jnp.zeros((3, 3, 8, 3)), "bias": jnp.zeros((3,))}}}
  mask = O.decay_mask(params)
  assert mask["img"]["Transformer"]["encoderblock"]["Dense_0"]["kernel"]
  assert not mask["img"]["Transformer"]["encoderblock"]["Dense_0"]["bias"]  # a stacked bias
  assert mask["decoder"]["conv_out"]["kernel"] and not mask["decoder"]["conv_out"]["bias"]


@pytest.mark.parametrize("scan", [False, True])
def test_freezing_leaves_frozen_params_bitwise_unchanged(scan):
  config = config_files.load("dualtoken_tiny").model
  config.scan_layers = scan
  params = init_variables(config, jax.random.key(0))["params"]
  frozen = recipe.frozen_for_stage(0, config.layer_sem)  # blocks 1..3 frozen, block 4 trains
  masks = O.trainable_masks(params, frozen=frozen)
  tx = O.with_freezing(optax.adamw(1e-2, weight_decay=0.1), masks)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  blocks = lambda p: p["img"]["Transformer"]
  if scan:
    kernel = lambda p: blocks(p)["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
    np.testing.assert_array_equal(kernel(new)[:3], kernel(params)[:3])
    assert not np.allclose(kernel(new)[3], kernel(params)[3])
  else:
    for i in range(3):
      np.testing.assert_array_equal(blocks(new)[f"encoderblock_{i}"]["MlpBlock_0"]["Dense_0"]["kernel"],
                                    blocks(params)[f"encoderblock_{i}"]["MlpBlock_0"]["Dense_0"]["kernel"])
    assert not np.allclose(blocks(new)["encoderblock_3"]["MlpBlock_0"]["Dense_0"]["kernel"],
                           blocks(params)["encoderblock_3"]["MlpBlock_0"]["Dense_0"]["kernel"])
  for path in (("img", "embedding", "kernel"), ("txt", "head", "kernel"), ("t",)):
    a, b = new, params
    for k in path:
      a, b = a[k], b[k]
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(new["decoder"]["conv_out"]["kernel"], params["decoder"]["conv_out"]["kernel"])
  trainable, total = O.count_trainable(params, masks)
  assert 0 < trainable < total


def test_stage_recipes_follow_the_spec():
  assert recipe.blocks(1, 3) == r"img/Transformer/encoderblock_(0|1|2)/.*"
  stage2 = recipe.training_config(config_files.load("dualtoken_tiny").model, stage=2)
  assert list(stage2.update_codebooks) == ["sem"] and not stage2.loss.pixel and not stage2.gan.enabled
  assert r"decoder/.*" in stage2.frozen and recipe.blocks(1, 4) in stage2.frozen
  stage1 = recipe.training_config(config_files.load("dualtoken_tiny").model, stage=1)
  assert stage1.gan.enabled and stage1.optimizer.b1 == 0.5 and stage1.loss.semantic.token_mse == 5.0
  with pytest.raises(ValueError, match="stage must be"):
    recipe.frozen_for_stage(3, 26)
