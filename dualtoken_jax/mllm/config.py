"""Configs of the unified DualToken MLLM: model, text format, data and training stages.

An experiment config (`training_config`) holds:

  model       the network: `llm` (a decoder config, `dualtoken_jax.llm.config`: Gemma,
              Qwen2 / Qwen2.5 or Llama),
              `tokenizer` (a DualToken tokenizer config, `dualtoken_jax.models.config`),
              `visual_vector` ("code_embeddings" | "postquant"), `projector`, `attention`
              ("causal" | "prefix_lm") and `special_tokens` (ordered [name, piece] pairs).
  text        the text tokenizer file (`tokenizer`: a SentencePiece `.model` or a HF
              `tokenizer.json`; `spm_model` is its older name) and the conversation
              template (the LLM family's own chat format, `TEMPLATES`).
  data, eval  LLaVA-style conversation files (train / held-out), image root, optional
              pre-computed codes, sequence length.
  init        where weights come from: the tokenizer, the LLM (HF or official Orbax), or a
              previous stage's workdir.
  trainable / frozen   regexes over parameter paths (`projector/...`, `llm/layer_3/...`).

Stages (paper Table "hyper_params", spec D.4): "alignment" trains the projector only (lr 1e-3,
batch 64), "sft" trains projector + LLM (lr 2e-5, batch 256), "generation" trains the two
visual heads with their projectors, LLM frozen (lr 1e-4, batch 128, caption -> image data),
"joint" trains everything (lr 1e-5, batch 512; understanding and generation samples mixed).
Every stage has the same parameter tree (heads included), so each starts from the previous
stage's workdir (`init.mllm`) and freezing is only a matter of regexes.
"""

from __future__ import annotations

import math

import ml_collections

from dualtoken_jax import config_files
from dualtoken_jax.models import config as tokenizer_config
from dualtoken_jax.parallel import sharding
from dualtoken_jax.llm import config as llm_config

VISUAL_VECTORS = ("code_embeddings", "postquant")
ATTENTION = ("causal", "prefix_lm")
STAGES = ("alignment", "sft", "generation", "joint")
IMAGE_START, IMAGE_END = "image_start", "image_end"
GEN_START, GEN_END = "image_gen_start", "image_gen_end"
# Gemma 3's own image delimiters; other vocabularies get them appended as new rows.
DEFAULT_SPECIAL_TOKENS = ((IMAGE_START, "<start_of_image>"), (IMAGE_END, "<end_of_image>"),
                          (GEN_START, "<image_gen_start>"), (GEN_END, "<image_gen_end>"))
# Gemma's chat format (the model turn's <end_of_turn> is scored, so the model learns to stop).
GEMMA_TEMPLATE = dict(user="<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n",
                      model="{text}<end_of_turn>\n", append_eos=False)
# Each family's chat format, as data. Beyond user/model/append_eos: `add_bos` (start with BOS),
# `prefix` (text after it, e.g. a system turn), and the pieces of BOS / EOS / pad ("" = the
# tokenizer's own: SentencePiece states them, a HF tokenizer.json does not).
_TEMPLATE_DEFAULTS = dict(add_bos=True, prefix="", bos="", eos="", pad="", turn_bos=False)
TEMPLATES = {
    "gemma": dict(_TEMPLATE_DEFAULTS, **GEMMA_TEMPLATE),
    # Qwen2 / Qwen2.5 ChatML: no BOS; <|im_end|> ends a turn (scored).
    "chatml": dict(_TEMPLATE_DEFAULTS,
                   user="<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
                   model="{text}<|im_end|>\n", append_eos=False, add_bos=False,
                   prefix="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
                   bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>"),
    # Llama 2 chat: <s>[INST] user [/INST] answer </s><s>[INST] ... (EOS appended to each
    # answer, BOS before each later question).
    "llama2": dict(_TEMPLATE_DEFAULTS, user="[INST] {text} [/INST]", model=" {text} ",
                   append_eos=True, turn_bos=True),
    # Llama 3 header tokens; <|eot_id|> ends a turn (scored).
    "llama3": dict(_TEMPLATE_DEFAULTS,
                   user="<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n",
                   model="{text}<|eot_id|>", append_eos=False, bos="<|begin_of_text|>",
                   eos="<|eot_id|>", pad="<|end_of_text|>"),
}
# The template of each decoder family (Llama 3 variants: `template_for`).
_FAMILY_TEMPLATE = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "qwen2": "chatml",
                    "llama": "llama2"}


ConfigError = tokenizer_config.ConfigError  # the project's one config error


def heads_config(*, width: int = 0, num_heads: int = 0, num_layers: int = 3, mlp_ratio: int = 4,
                 dropout: float = 0.1) -> ml_collections.ConfigDict:
  """The two depth-transformer heads (`depth_head.py`). width 0 = the LLM width; num_heads 0 =
  width // 128 (at least 1). The paper gives 3 layers and ~258M parameters per head at a
  2048-wide LLM (K = 16384 classifiers per depth); width and heads are not published."""
  return ml_collections.ConfigDict(dict(width=width, num_heads=num_heads, num_layers=num_layers,
                                        mlp_ratio=mlp_ratio, dropout=dropout))


def model_config(llm: ml_collections.ConfigDict, tokenizer: ml_collections.ConfigDict, *,
                 visual_vector: str = "code_embeddings", attention: str = "causal",
                 projector_hidden: int = 0, heads=None,
                 special_tokens=DEFAULT_SPECIAL_TOKENS) -> ml_collections.ConfigDict:
  """The network's config. `projector_hidden` 0 means the LLM width (the paper's
  2048 -> 2048 -> 2048 for Qwen2.5-3B); `heads` a `heads_config`."""
  config = ml_collections.ConfigDict(dict(
      llm=llm,
      tokenizer=tokenizer,
      # Default: the sums of the code embeddings over depth (paper appendix and VILA-U: the
      # projector sees concatenated codebook vectors). They are exactly what part 2 feeds back
      # for generated images, need only the codebooks (no attention blocks per generated
      # position), and are what pre-computed codes give without running any tokenizer block.
      # "postquant" uses the tokenizer's post-quant features (width-d per branch, causal in
      # raster order), which sit closer to SigLIP's own feature space.
      visual_vector=visual_vector,
      projector=dict(hidden_dim=projector_hidden),
      heads=heads if heads is not None else heads_config(),
      attention=attention,
      special_tokens=[list(p) for p in special_tokens],
  ))
  validate_model(config)
  return config


# Per Gemma family: the image delimiters (reserved rows where the vocabulary has them, so the
# table keeps its size) and the end-of-turn id that ends a chat answer.
_FAMILY_TOKENS = {
    "gemma": ((IMAGE_START, "<unused0>"), (IMAGE_END, "<unused1>"),
              (GEN_START, "<unused2>"), (GEN_END, "<unused3>")),
    "gemma2": ((IMAGE_START, "<unused0>"), (IMAGE_END, "<unused1>"),
               (GEN_START, "<unused2>"), (GEN_END, "<unused3>")),
    "gemma3": ((IMAGE_START, "<start_of_image>"), (IMAGE_END, "<end_of_image>"),
               (GEN_START, "<unused0>"), (GEN_END, "<unused1>")),
    # Qwen2.5's own vision delimiters; the generation ones are appended after the tokenizer's
    # 151,665 ids, inside the embedding table's padding rows (151,936 / 152,064): no growth.
    "qwen2": ((IMAGE_START, "<|vision_start|>"), (IMAGE_END, "<|vision_end|>"),
              (GEN_START, "<|image_gen_start|>"), (GEN_END, "<|image_gen_end|>")),
    # Llama 2's SentencePiece has no spare pieces: four appended rows (`_APPENDED_ROWS`).
    "llama": DEFAULT_SPECIAL_TOKENS,
}
_LLAMA3_TOKENS = tuple((name, f"<|reserved_special_token_{i}|>")
                       for i, name in enumerate((IMAGE_START, IMAGE_END, GEN_START, GEN_END)))
# Per family: the ids that end a chat answer (end of turn, EOS), None = the variant's own.
_END_OF_TURN = {"gemma": (1, 107), "gemma2": (1, 107), "gemma3": (1, 106), "qwen2": None,
                "llama": None}


def special_tokens_for(llm_variant: str, family: str) -> tuple:
  """The [name, piece] special tokens of a decoder variant (its reserved pieces where it has
  them: Gemma's unused rows, Qwen2.5's vision tokens, Llama 3's reserved tokens)."""
  if template_for(llm_variant, family) == "llama3":
    return _LLAMA3_TOKENS
  return _FAMILY_TOKENS[family]


def template_for(llm_variant: str, family: str) -> str:
  """The name (in `TEMPLATES`) of a decoder variant's chat format."""
  return "llama3" if llm_variant.startswith("llama3") else _FAMILY_TEMPLATE[family]


def paper_model(llm_variant: str, tokenizer_spec: str, **kwargs) -> ml_collections.ConfigDict:
  """A released decoder (Gemma, Qwen2.5 or Llama; bf16 compute, fp32 weights, scanned and
  rematerialised layers) on a DualToken tokenizer config file (its text tower dropped: the
  MLLM never runs it). Special tokens reuse the family's reserved pieces where it has them;
  a vocabulary without spare rows (Llama 2) grows by the appended ones."""
  from dualtoken_jax import config_files  # pylint: disable=g-import-not-at-top
  llm = llm_config.get_config(llm_variant, dtype="bfloat16", scan_layers=True,
                              remat_policy="full")
  if _END_OF_TURN[llm.family] is not None:
    llm.eos_ids = _END_OF_TURN[llm.family]
  tokenizer = config_files.model_of(config_files.load(tokenizer_spec))
  tokenizer.text = None
  kwargs.setdefault("special_tokens", special_tokens_for(llm_variant, llm.family))
  if llm.family == "llama" and template_for(llm_variant, llm.family) == "llama2":
    # Llama 2: 32,000 pieces, no reserved ones: the table grows by the appended tokens.
    llm.vocab_size += len(kwargs["special_tokens"])
  return model_config(llm, tokenizer, **kwargs)


# The args every paper-stage config file takes (`configs/mllm_*.py:llm=…,tokenizer=…`); the
# default decoder is the paper's, Qwen2.5-3B.
PAPER_ARGS = dict(llm="qwen2.5_3b", tokenizer="dualtoken_siglip_l16", visual="code_embeddings",
                  attention="causal", head_width=0)


def paper_stage(arg: str | None, stage: str, *, total_steps: int, max_len: int, batch_size=None,
                **more_args) -> ml_collections.ConfigDict:
  """The experiment config of one paper stage from a config file's `arg` string:
  llm (a `dualtoken_jax.llm` variant), tokenizer (a tokenizer config file), visual
  (code_embeddings | postquant), attention (causal | prefix_lm), head_width (0 = the LLM width),
  plus `more_args` (name=default) for the file's own. `batch_size` may be a function of the args."""
  from dualtoken_jax import config_files  # pylint: disable=g-import-not-at-top
  arg = config_files.parse_arg(arg, **PAPER_ARGS, **more_args)
  model = paper_model(arg.llm, arg.tokenizer, visual_vector=arg.visual, attention=arg.attention,
                      heads=heads_config(width=arg.head_width))
  extra = {} if batch_size is None else {"batch_size": batch_size(arg)}
  c = training_config(model, stage=stage, total_steps=total_steps, **extra)
  c.text.template = dict(TEMPLATES[template_for(arg.llm, model.llm.family)])
  c.data.max_len = max_len
  return c


def validate_model(config) -> None:
  """Raises ConfigError naming the first inconsistent field."""
  if config.visual_vector not in VISUAL_VECTORS:
    raise ConfigError(f"model.visual_vector must be one of {VISUAL_VECTORS}, got "
                      f"{config.visual_vector!r}")
  if config.attention not in ATTENTION:
    raise ConfigError(f"model.attention must be one of {ATTENTION}, got {config.attention!r}")
  if config.projector.hidden_dim < 0:
    raise ConfigError(f"model.projector.hidden_dim must be >= 0 (0 = LLM width), got "
                      f"{config.projector.hidden_dim}")
  names = [p[0] for p in config.special_tokens]
  if any(len(p) != 2 for p in config.special_tokens) or len(set(names)) != len(names):
    raise ConfigError(f"model.special_tokens must be unique [name, piece] pairs, got "
                      f"{config.special_tokens!r}")
  h = config.heads
  if h.width < 0 or h.num_heads < 0 or h.num_layers < 1 or not 0 <= h.dropout < 1:
    raise ConfigError(f"model.heads: width/num_heads >= 0, num_layers >= 1, dropout in [0, 1); "
                      f"got {h.to_dict()}")
  if head_width(config) % head_count(config):
    raise ConfigError(f"model.heads: width {head_width(config)} is not divisible by "
                      f"num_heads {head_count(config)}")
  for required in (IMAGE_START, IMAGE_END, GEN_START, GEN_END):
    if required not in names:
      raise ConfigError(f"model.special_tokens lacks {required!r} (has {names})")
  try:
    llm_config.validate(config.llm)
  except llm_config.ConfigError as e:
    raise ConfigError(f"model.llm: {e}") from e
  try:
    tokenizer_config.validate(config.tokenizer)
  except ValueError as e:
    raise ConfigError(f"model.tokenizer: {e}") from e


def num_image_positions(config) -> int:
  """N, the LLM positions of one image (the tokenizer's patch grid, raster order)."""
  return tokenizer_config.grid_size(config.tokenizer) ** 2


def visual_dim(config) -> int:
  """Channels of the concatenated [pixel; semantic] visual vector the projector reads."""
  t = config.tokenizer
  if config.visual_vector == "code_embeddings":
    return t.vq_pix.embed_dim + t.vq_sem.embed_dim
  return 2 * t.vision.width  # both post-quant blocks map back to the ViT width


def projector_hidden(config) -> int:
  return config.projector.hidden_dim or config.llm.width


def head_width(config) -> int:
  return config.heads.width or config.llm.width


def head_count(config) -> int:
  return config.heads.num_heads or max(head_width(config) // 128, 1)


def text_config(spm_model: str = "", template=None,
                tokenizer: str = "") -> ml_collections.ConfigDict:
  """The text tokenizer file (user-supplied: a SentencePiece `.model` or a HF `tokenizer.json`,
  in `tokenizer`; `spm_model` is the older name of the same field) and conversation template.

  Template: `user` and `model` are format strings around each turn's `{text}`; the prompt of
  a model turn is everything up to it, and the model turn's formatted text (plus EOS when
  `append_eos`) is what the loss scores. See `TEMPLATES` for the other fields.
  """
  return ml_collections.ConfigDict(dict(
      tokenizer=tokenizer, spm_model=spm_model,
      template=dict(_TEMPLATE_DEFAULTS, **(template or GEMMA_TEMPLATE))))


def tokenizer_path(text) -> str:
  """The tokenizer file of a `text` config: `tokenizer`, else the older `spm_model`."""
  path = text.get("tokenizer", "") or text.get("spm_model", "")
  if not path:
    raise ConfigError("config.text.tokenizer must name the text tokenizer file (a SentencePiece "
                      ".model or a HF tokenizer.json)")
  return path


def template_pieces(template) -> dict[str, str]:
  """role -> piece of BOS / EOS / pad a template names ("" = the tokenizer's own)."""
  return {role: str(template.get(role, "") or "") for role in ("bos", "eos", "pad")}


# Per stage (paper Table "hyper_params"): (trainable regexes, lr, batch size, share of
# generation samples in the stream). Paths are `projector/...`, `llm/...`, `gen_pixel/...`,
# `gen_semantic/...` (each head's own projector `gen_*/proj` included).
STAGE_RECIPES = {
    "alignment": ([r"projector/.*"], 1e-3, 64, 0.0),
    "sft": ([r"projector/.*", r"llm/.*"], 2e-5, 256, 0.0),
    "generation": ([r"gen_pixel/.*", r"gen_semantic/.*"], 1e-4, 128, 1.0),
    "joint": ([".*"], 1e-5, 512, 0.5),
}


def training_config(model: ml_collections.ConfigDict, *, stage: str = "sft",
                    batch_size: int | None = None, total_steps: int = 10_000,
                    lr: float | None = None) -> ml_collections.ConfigDict:
  """An experiment config around `model` with the stage's freezing and paper hyper-parameters."""
  if stage not in STAGES:
    raise ConfigError(f"stage must be one of {STAGES}, got {stage!r}")
  trainable, stage_lr, stage_batch, generation_share = STAGE_RECIPES[stage]
  c = ml_collections.ConfigDict()
  c.model = model
  c.stage = stage
  c.seed = 0
  c.batch_size = batch_size or stage_batch
  c.total_steps = total_steps
  c.stop_at_step = 0  # stop (with a checkpoint) after this step; 0 = total_steps
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.sharding_rules = [list(r) for r in sharding.DEFAULT_RULES]
  c.distributed = False

  c.text = text_config(template=TEMPLATES[_FAMILY_TEMPLATE[model.llm.family]])
  c.data = dict(
      train="",          # understanding: LLaVA JSON list or JSONL {"image", "conversations"}
      captions="",       # generation: JSON/JSONL {"image", "caption"} or webdataset .tar shards
                         # (a path, glob or brace pattern; captions from .txt / .json members)
      generation_share=generation_share,  # fraction of generation samples when both are set
      caption_dropout=0.1,  # captions replaced by "" (the CFG unconditional prompt)
      image_root="",     # relative image paths are resolved against it
      codes="",          # pre-computed codes (.npz or ArrayRecord dir from `tokenize`); "" =
                         # run the frozen tokenizer on the images inside the step
      max_len=512,       # tokens per sequence (image positions included)
      num_workers=0,
      max_consecutive_skips=1000)
  c.loss = dict(text_weight=1.0, image_weight=1.0)  # image: mean CE over (position, depth) codes
  c.eval = dict(data="", every_steps=1000, batch_size=0)  # batch 0 = the training batch size
  c.init = dict(
      tokenizer="",          # a DualTokenizer.save dir or a `train` workdir ("" = random)
      tokenizer_seed=0,
      llm_hf="",             # a HF checkpoint dir (Gemma, Qwen2 / Qwen2.5, Llama), or
      llm_orbax="",          # an official Gemma Flax/Orbax checkpoint
      mllm="")               # a previous stage's workdir (its newest checkpoint's params)

  c.trainable = list(trainable)
  c.frozen = []
  c.optimizer = dict(lr=lr or stage_lr, b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=0.0, warmup_steps=max(total_steps // 33, 1),
                     grad_clip_norm=1.0)
  c.checkpoint = dict(every_steps=1000, keep=3, async_save=True,
                      checksums=False)  # sha256 manifests per step (slower saves; checkpoints.py)
  c.log_every_steps = 50
  c.max_consecutive_nonfinite = 20
  c.demo = False  # configs/demo_mllm_cpu.py: build the bundled-photo data set, report at the end
  # The stage the stage-derived fields were built for (do not set): `validate` re-derives them
  # when `stage` was overridden since (`apply_stage`).
  c.derived_from = dict(stage=stage)
  return c


def stage_fields(stage: str) -> dict:
  """The fields `stage` decides (dotted path -> value), as `training_config` sets them."""
  trainable, lr, batch, generation_share = STAGE_RECIPES[stage]
  return {"trainable": list(trainable), "optimizer.lr": lr, "batch_size": batch,
          "data.generation_share": generation_share}


def apply_stage(config) -> list[str]:
  """After `--config.stage=...`: the stage-derived fields (trainable, optimizer.lr, batch_size,
  data.generation_share) that still hold the old stage's values follow the new stage; any set
  to another value (by the config file or an override) is kept. In place; returns the paths
  changed. The same rule as the tokenizer recipe's (`tokenizer_training.recipe.apply_stage`)."""
  if config.stage not in STAGES:
    raise ConfigError(f"stage must be one of {STAGES}, got {config.stage!r}")
  if "derived_from" not in config or config.derived_from.stage == config.stage:
    return []
  changed = config_files.rederive(config, stage_fields(config.derived_from.stage),
                                  stage_fields(config.stage))
  config.derived_from.stage = config.stage
  return changed


def validate(config) -> None:
  """Checks an experiment config before anything is built (after re-deriving the stage's
  fields, `apply_stage`), raising ConfigError naming the field."""
  apply_stage(config)
  validate_model(config.model)
  config_files.check_positive_ints(config, "total_steps", "batch_size", "log_every_steps",
                                   "checkpoint.every_steps", "checkpoint.keep", "eval.every_steps",
                                   "max_consecutive_nonfinite")
  config_files.check_optimizer(config, "optimizer")
  if not 0 <= config.stop_at_step <= config.total_steps:
    raise ConfigError(f"stop_at_step {config.stop_at_step} must be in [0, total_steps="
                      f"{config.total_steps}]")
  for name, weight in config.loss.items():
    if not (math.isfinite(weight) and weight >= 0):
      raise ConfigError(f"loss.{name} must be finite and >= 0, got {weight}")
  if config.eval.batch_size < 0:
    raise ConfigError(f"eval.batch_size must be >= 0 (0 = the training batch), got "
                      f"{config.eval.batch_size}")
  tokenizer_path(config.text)
  both = config.text.get("tokenizer", ""), config.text.get("spm_model", "")
  if all(both) and both[0] != both[1]:
    raise ConfigError(f"config.text.tokenizer {both[0]!r} and config.text.spm_model {both[1]!r} "
                      "name different files; set one")
  t = config.text.template
  for name in ("user", "model"):
    if "{text}" not in t[name]:
      raise ConfigError(f"config.text.template.{name} must contain '{{text}}', got {t[name]!r}")
  if not config.data.train and not config.data.captions:
    raise ConfigError("set config.data.train (LLaVA conversations) and/or config.data.captions "
                      "(caption-image pairs for generation)")
  if not 0.0 <= config.data.generation_share <= 1.0:
    raise ConfigError(f"config.data.generation_share must be in [0, 1], got "
                      f"{config.data.generation_share}")
  n = num_image_positions(config.model)
  if config.data.max_len < n + 4:
    raise ConfigError(f"config.data.max_len {config.data.max_len} cannot hold an image "
                      f"({n} positions) plus its delimiters and text")
  if config.init.llm_hf and config.init.llm_orbax:
    raise ConfigError("set at most one of config.init.llm_hf and config.init.llm_orbax")
  if config.init.llm_orbax and config.model.llm.family not in llm_config.GEMMA_FAMILIES:
    raise ConfigError(f"config.init.llm_orbax reads official Gemma checkpoints only; a "
                      f"{config.model.llm.family} decoder loads from config.init.llm_hf")


def from_dict(d) -> ml_collections.ConfigDict:
  """An experiment config back from `config.to_dict()` as stored in a checkpoint's metadata
  (JSON turns tuples into lists): the decoder and tokenizer configs are read with their own
  `from_dict`, over their current defaults."""
  config = ml_collections.ConfigDict(d)
  config.model.llm = llm_config.from_dict(config.model.llm.to_dict())
  config.model.tokenizer = tokenizer_config.from_dict(config.model.tokenizer.to_dict())
  validate_model(config.model)
  return config
