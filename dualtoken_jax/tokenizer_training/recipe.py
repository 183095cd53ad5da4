"""The paper's training recipe as config data: stages, frozen parts, loss weights, optimisers.

Stages (spec B.2): 0 warms up the tokenizer-specific modules on a frozen SigLIP (blocks up to
`layer_sem` and embeddings frozen); 1 is the paper's main run (everything but the text tower
trains, GAN on); 2 fine-tunes the semantic side with the pixel side frozen — the reference's
stage-2 script crashes on wrong module names; here the intended freezing is applied.
"""

from __future__ import annotations

import ml_collections

from dualtoken_jax.models import config as model_config
from dualtoken_jax.parallel import sharding

_TOWERS_NOT_TRAINED = [r"txt/.*", r"t", r"b"]  # text tower, logit scale/bias
_PIXEL_SIDE = [r"prequant_pix/.*", r"prequant_shortcut/.*", r"postquant_pix/.*",
               r"post_quant_conv/.*", r"decoder/.*"]


def blocks(first: int, last: int) -> str:
  """Regex for image-tower blocks first..last (1-based, inclusive), per-block paths."""
  ids = "|".join(str(i) for i in range(first - 1, last))
  return rf"img/Transformer/encoderblock_({ids})/.*"


def frozen_for_stage(stage: int, layer_sem: int) -> list[str]:
  embeddings = [r"img/embedding/.*", r"img/pos_embedding"]
  if stage == 0:
    return _TOWERS_NOT_TRAINED + embeddings + [blocks(1, layer_sem)]
  if stage == 1:
    return list(_TOWERS_NOT_TRAINED)
  if stage == 2:
    return _TOWERS_NOT_TRAINED + embeddings + [blocks(1, 4)] + _PIXEL_SIDE
  raise ValueError(f"stage must be 0, 1 or 2, got {stage}")


def loss_config(stage: int) -> ml_collections.ConfigDict:
  """Loss weights of a stage (spec B.2/B.3). `sem_weight` scales the whole semantic term."""
  semantic = {0: (0.0, 0.0, 5.0, 5.0), 1: (5.0, 5.0, 1.0, 1.0), 2: (0.0, 1.0, 5.0, 5.0)}[stage]
  return ml_collections.ConfigDict(dict(
      sem_weight=1.0,
      semantic=dict(zip(("token_mse", "token_cos", "pool_mse", "pool_cos"), semantic)),
      commit_pix=0.0 if stage == 2 else 5.0,
      commit_sem=5.0,
      pixel=stage != 2,        # stage 2 has no pixel terms at all (and skips the decoder)
      mse=5.0,
      lpips=1.0,
      lpips_weights="",        # an .npz from `python -m dualtoken_jax.convert_lpips`; "" = no LPIPS
      # Images per batch shard that the decoder, LPIPS and D process at a time (0 = the whole
      # batch): same values and gradients, memory of a chunk instead of the batch.
      pixel_chunk=0,
  ))


def training_config(model: ml_collections.ConfigDict, *, stage: int = 1, batch_size: int = 256,
                    total_steps: int = 781_250, steps_per_epoch: int = 39_063
                    ) -> ml_collections.ConfigDict:
  """A full experiment config around tokenizer `model` (defaults: the reference's stage 1 run,
  20 epochs x 10M CC12M images at batch 256)."""
  c = ml_collections.ConfigDict()
  c.model = model
  c.stage = stage
  c.seed = 0
  c.batch_size = batch_size
  c.total_steps = total_steps  # sets the schedules' horizon
  c.stop_at_step = 0            # stop (with a checkpoint) after this step; 0 = total_steps
  c.steps_per_epoch = steps_per_epoch
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.sharding_rules = [list(r) for r in sharding.DEFAULT_RULES]
  c.distributed = False  # jax.distributed.initialize() (multi-host TPU slices)

  c.init = dict(siglip="", tokenizer="", reference="", reference_config="")
  c.teacher = dict(siglip="")  # "" = a frozen copy of the initial image tower
  c.data = dict(source="webdataset", path="", image_key="image", record_format="tf_example",
                num_workers=0, max_consecutive_skips=1000)

  c.trainable = [".*"]
  c.frozen = frozen_for_stage(stage, model.layer_sem)
  c.update_codebooks = ["sem"] if stage == 2 else ["pix", "sem"]  # EMA only; never gradients
  c.loss = loss_config(stage)
  if stage == 0:
    c.optimizer = dict(lr=1e-4, b1=0.9, b2=0.98, eps=1e-8, weight_decay=1e-4, warmup_steps=100_000,
                       grad_clip_norm=0.0)
  else:
    c.optimizer = dict(lr=7.2e-5, b1=0.5, b2=0.9, eps=1e-8, weight_decay=1e-4, warmup_steps=10_000,
                       grad_clip_norm=0.0)
  # GAN (stage 1 only). Without a warm start the reference turns it on halfway through the start
  # epoch; its discriminator warms up for half an epoch and decays to 4e-5.
  c.gan = dict(enabled=stage == 1, start_step=steps_per_epoch // 2, ndf=64, weight=0.75,
               adaptive_min=0.3, adaptive_max=10.0, lr=7.2e-5, b1=0.5, b2=0.9,
               warmup_steps=steps_per_epoch // 2, end_lr=4e-5, d_weight=0.75, start_epoch_d_weight=1.0)

  c.checkpoint = dict(every_steps=2000, keep=3, async_save=True)
  c.log_every_steps = 50
  c.eval = dict(every_steps=5000, images="sample", num_images=8)
  c.max_consecutive_nonfinite = 20
  return c


def attention_chunk(tokens: int) -> int:
  """Queries per attention block: the smallest divisor of `tokens` that is at least a ninth of
  them (81 of 729 at 384 px, 32 of 256 at 256 px), so no block is padding."""
  return min(d for d in range(1, tokens + 1) if tokens % d == 0 and d >= tokens // 9)


def paper_recipe(model: ml_collections.ConfigDict, stage: int = 1) -> ml_collections.ConfigDict:
  """The reference's run (spec B.4): CC12M shards, batch 256, 20 epochs of 10M images, SigLIP
  weights from `--config.init.siglip`; bf16 compute with fp32 weights and rematerialisation so
  the So400m step fits a 16 GiB chip under fsdp=8 (see `python -m dualtoken_jax.bench memory`).
  None of the memory settings changes what is computed, only when and how much at a time."""
  c = training_config(model, stage=stage, batch_size=256, total_steps=781_250, steps_per_epoch=39_063)
  c.model.dtype = "bfloat16"
  c.model.scan_layers, c.model.remat_policy = True, "full"
  c.model.decoder.remat = True
  c.model.attention_chunk = attention_chunk(model_config.tokens_per_image(model))
  c.loss.pixel_chunk = 2  # images per device at a time; the full-resolution maps dominate at 384 px
  c.data.source = "webdataset"
  c.data.path = "cc12m-train-{0000..2175}.tar"  # point at your copy: --config.data.path=gs://…
  return c
