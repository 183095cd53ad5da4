"""The paper's training recipe as config data: stages, frozen parts, loss weights, optimisers.

Stages (spec B.2): 0 warms up the tokenizer-specific modules on a frozen SigLIP (blocks up to
`layer_sem` and embeddings frozen); 1 is the paper's main run (everything but the text tower
trains, GAN on); 2 fine-tunes the semantic side with the pixel side frozen — the reference's
stage-2 script crashes on wrong module names; here the intended freezing is applied.

`stage` may be overridden after the config is built (`--config.stage=2`): `validate` (which
`train_and_evaluate` calls first) re-derives the stage's fields (`stage_fields`: frozen,
update_codebooks, loss weights, optimizer, gan.enabled) from the new stage, and from a new
`model.layer_sem`. The rule: a derived field that still holds the value the recipe gave it
follows the stage; one that holds anything else was set on purpose (by the config file or a
`--config.x=` override) and wins. (So an override back to exactly the old stage's value cannot
be told from no override: it follows the stage too.)
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from dualtoken_jax.data import decode
from dualtoken_jax import config_files
from dualtoken_jax.data import global_batch
from dualtoken_jax.models import config as model_config
from dualtoken_jax.parallel import sharding
from dualtoken_jax.tokenizer_training import inputs

ConfigError = model_config.ConfigError
STAGES = (0, 1, 2)

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
  raise ConfigError(f"stage must be 0, 1 or 2, got {stage}")


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
                num_workers=0, max_consecutive_skips=1000,
                max_image_bytes=decode.DEFAULT_MAX_BYTES,  # bigger image files are skipped
                # Append the keys this process trained on, per step, to
                # WORKDIR/data_keys/process_<i>.jsonl (which host read what, on a pod).
                log_keys=False)

  c.trainable = [".*"]
  c.frozen = frozen_for_stage(stage, model.layer_sem)
  c.update_codebooks = ["sem"] if stage == 2 else ["pix", "sem"]  # EMA only; never gradients
  c.loss = loss_config(stage)
  c.optimizer = optimizer_config(stage)
  # GAN (stage 1 only). Without a warm start the reference turns it on halfway through the start
  # epoch; its discriminator warms up for half an epoch and decays to 4e-5.
  c.gan = dict(enabled=stage == 1, start_step=steps_per_epoch // 2, ndf=64, weight=0.75,
               adaptive_min=0.3, adaptive_max=10.0, lr=7.2e-5, b1=0.5, b2=0.9,
               warmup_steps=steps_per_epoch // 2, end_lr=4e-5, d_weight=0.75, start_epoch_d_weight=1.0)

  c.checkpoint = dict(every_steps=2000, keep=3, async_save=True,
                      checksums=False)  # sha256 manifests per step (slower saves; checkpoints.py)
  c.log_every_steps = 50
  c.eval = dict(every_steps=5000, images="sample", num_images=8)
  c.max_consecutive_nonfinite = 20
  # What the stage-derived fields were built for (do not set): `validate` re-derives them when
  # `stage` or `model.layer_sem` has been overridden since (see the module docstring).
  c.derived_from = dict(stage=stage, layer_sem=model.layer_sem)
  return c


def optimizer_config(stage: int) -> dict[str, Any]:
  if stage == 0:
    return dict(lr=1e-4, b1=0.9, b2=0.98, eps=1e-8, weight_decay=1e-4, warmup_steps=100_000,
                grad_clip_norm=0.0)
  return dict(lr=7.2e-5, b1=0.5, b2=0.9, eps=1e-8, weight_decay=1e-4, warmup_steps=10_000,
              grad_clip_norm=0.0)


def stage_fields(stage: int, layer_sem: int) -> dict[str, Any]:
  """The fields `stage` decides, as dotted path -> value (what `training_config` sets)."""
  fields = {"frozen": frozen_for_stage(stage, layer_sem),
            "update_codebooks": ["sem"] if stage == 2 else ["pix", "sem"],
            "gan.enabled": stage == 1}
  fields.update(_flat(loss_config(stage).to_dict(), "loss."))
  fields.update(_flat(optimizer_config(stage), "optimizer."))
  return fields


def _flat(d: dict, prefix: str) -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def apply_stage(config: ml_collections.ConfigDict) -> list[str]:
  """Re-derives the stage's fields in place after `stage` / `model.layer_sem` were overridden;
  fields set to anything but their derived value are kept. Returns the paths it changed."""
  if config.stage not in STAGES:
    raise ConfigError(f"stage must be one of {STAGES}, got {config.stage!r}")
  if "derived_from" not in config:  # not built by `training_config`: nothing to re-derive
    return []
  was = config.derived_from
  now = dict(stage=config.stage, layer_sem=config.model.layer_sem)
  if (was.stage, was.layer_sem) == (now["stage"], now["layer_sem"]):
    return []
  changed = config_files.rederive(config, stage_fields(was.stage, was.layer_sem),
                                  stage_fields(**now))
  config.derived_from.stage, config.derived_from.layer_sem = now["stage"], now["layer_sem"]
  return changed


def validate(config: ml_collections.ConfigDict, mesh=None) -> None:
  """Checks a tokenizer training config before anything is built, raising `ConfigError` naming
  the first bad field; first re-derives the stage's fields (`apply_stage`, in place). With
  `mesh`, also that `batch_size` splits over its batch shards (without, the trainer's
  `data.host_batch_size` checks that as soon as the mesh exists, still before compiling)."""
  apply_stage(config)
  try:
    model_config.validate(config.model)
  except ConfigError as e:
    raise ConfigError(f"model: {e}") from e
  _positive_int(config, "total_steps", "steps_per_epoch", "batch_size", "log_every_steps",
                "eval.every_steps", "checkpoint.every_steps", "checkpoint.keep",
                "max_consecutive_nonfinite")
  _check(0 <= config.stop_at_step <= config.total_steps,
         f"stop_at_step {config.stop_at_step} must be in [0, total_steps={config.total_steps}]")
  _optimizer(config, "optimizer")
  unknown = set(config.update_codebooks) - {"pix", "sem"}
  _check(not unknown, f"update_codebooks may only name 'pix' and 'sem', got {list(config.update_codebooks)}")
  loss = config.loss
  for path in ["sem_weight", "commit_pix", "commit_sem", "mse", "lpips", "pixel_chunk"] + [
      f"semantic.{k}" for k in loss.semantic]:
    value = config_files.get_path(loss, path)
    _check(math.isfinite(value) and value >= 0, f"loss.{path} must be finite and >= 0, got {value}")
  if config.gan.enabled:
    g = config.gan
    _check(0 <= g.start_step < config.total_steps,
           f"gan.start_step {g.start_step} is not within the run [0, total_steps="
           f"{config.total_steps}): the GAN would never train (set gan.enabled=False for none)")
    _optimizer(config, "gan")
    for name in ("end_lr", "weight", "d_weight", "start_epoch_d_weight", "adaptive_min"):
      _check(math.isfinite(g[name]) and g[name] >= 0, f"gan.{name} must be finite and >= 0, got {g[name]}")
    _check(g.adaptive_min <= g.adaptive_max,
           f"gan.adaptive_min {g.adaptive_min} > gan.adaptive_max {g.adaptive_max}")
    _positive_int(config, "gan.ndf")
  _check(config.data.source in inputs.SOURCES,
         f"data.source must be one of {inputs.SOURCES}, got {config.data.source!r}")
  _check(config.data.source == "sample" or bool(config.data.path),
         f"data.source={config.data.source!r} needs data.path")
  if mesh is not None:
    global_batch.host_batch_size(config.batch_size, mesh)  # ConfigError unless it splits evenly


_check = config_files.check
_optimizer = config_files.check_optimizer
_positive_int = config_files.check_positive_ints


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
