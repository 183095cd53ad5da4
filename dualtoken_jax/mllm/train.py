"""`train_and_evaluate(config, workdir)`: the MLLM training run (alignment, understanding SFT,
generation or joint), resumable and sharded; `python -m dualtoken_jax.train_mllm` calls it.

Re-running on an existing workdir resumes from its newest checkpoint (model, optimiser, data
position and skip counts), bit-exactly on the same machine. The mesh, state set-up, step loop,
checkpointing, metrics and bad-data handling are the shared ones of `training/`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
from clu import parameter_overview
from jax.sharding import NamedSharding, PartitionSpec

from dualtoken_jax import data

from dualtoken_jax.parallel import distributed
from dualtoken_jax.parallel import sharding
from dualtoken_jax.mllm import caption_data
from dualtoken_jax.mllm import config as C
from dualtoken_jax.mllm import data as mdata
from dualtoken_jax.mllm import demo
from dualtoken_jax.mllm import sequence
from dualtoken_jax.mllm import state as S
from dualtoken_jax.mllm.step import make_eval_step, make_train_step
from dualtoken_jax.training import checkpoints
from dualtoken_jax.training import optimizer as O
from dualtoken_jax.training import perf
from dualtoken_jax.training import state as T
from dualtoken_jax.training.loop import run_training_loop
from dualtoken_jax.training.metrics_log import MetricLogger


def train_and_evaluate(config, workdir: str | Path) -> dict:
  """Trains the MLLM `config` describes under `workdir`; returns the last evaluation."""
  workdir = Path(workdir)
  if config.demo:
    demo.prepare(config, workdir)
  C.validate(config)
  distributed.initialize(config.distributed)  # the launcher's environment, or auto-detection
  mesh = sharding.make_mesh(config.mesh)
  logger = MetricLogger(workdir)
  logging.info("MLLM stage %s: %s; mesh %s; %d process(es)", config.stage,
               config.model.visual_vector, dict(mesh.shape), jax.process_count())

  # ---------------------------------------------------------------- text and input
  vocab = sequence.Vocabulary.from_text_config(config.text, config.model.special_tokens)
  vocab.check_llm(config.model.llm)
  if jax.process_index() == 0:  # the run's own copy of its text tokenizer (either kind)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / vocab.workdir_file).write_bytes(vocab.model_proto)
  layout = sequence.Layout.from_config(config)
  codes = mdata.CodeTable(config.data.codes) if config.data.codes else None
  prepare = mdata.PrepareExample(vocab, layout, config.model.tokenizer, codes,
                                 config.data.image_root)
  per_host = data.host_batch_size(config.batch_size, mesh)
  train_iter = iter(mdata.make_train_dataset(
      training_sources(config), prepare, batch_size=per_host, seed=config.seed,
      num_workers=config.data.num_workers, caption_dropout=config.data.caption_dropout,
      max_consecutive_skips=config.data.max_consecutive_skips))
  eval_set = None
  if config.eval.data:
    eval_batch = data.host_batch_size(config.eval.batch_size or config.batch_size, mesh)
    eval_set, eval_skipped = mdata.eval_batches(
        mdata.ConversationSource(config.eval.data, config.data.image_root), prepare, eval_batch)
    logging.info("eval set: %d batches per host; skipped %s", len(eval_set), eval_skipped)

  # ---------------------------------------------------------------- state
  modules = S.Modules(config)
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", **config.checkpoint)
  state, layout, start = T.setup_state(modules, mesh, ckpt, train_iter)
  shardings = layout.shardings
  if start == 0:
    trainable, total = O.count_trainable(state.params, modules.masks(state.params))
    logging.info("%d of %d parameters train", trainable, total)
    logger.text("parameter_overview", parameter_overview.get_parameter_overview(state.params))
  else:
    logging.info("resumed from step %d", start)

  # ---------------------------------------------------------------- steps
  batch_sharding = data.batch_sharding(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  train_step = jax.jit(make_train_step(modules, mesh), in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(modules, mesh),
                      in_shardings=(shardings.params, shardings.tokenizer, batch_sharding),
                      out_shardings=replicated)

  def run_eval(state, step: int) -> dict:
    if eval_set is None:
      return {}
    result = evaluate(eval_step, state, eval_set, mesh)
    logger.scalars(step, {f"eval/{k}": v for k, v in result.items()})
    logging.info("step %d: eval %s", step, result)
    return {"step": step, **result}

  # ---------------------------------------------------------------- loop
  flops = {}
  def step_flops(state, step, batch):  # per device, from the compiled step (training/perf.py)
    if "step" not in flops:
      flops["step"] = perf.step_flops(train_step, state, global_batch(batch, mesh, abstract=True))
    return flops["step"]

  state, last_eval = run_training_loop(
      state, config=config, start=start, train_iter=train_iter,
      train_step=lambda state, step, batch: train_step(state, global_batch(batch, mesh)),
      run_eval=run_eval, ckpt=ckpt, logger=logger,
      step_flops=step_flops)
  if config.demo and jax.process_index() == 0 and int(state.step) >= config.total_steps:
    last_eval["demo"] = demo.report(config, state, vocab, workdir)
  return last_eval


def training_sources(config) -> list:
  """[(source, weight)]: conversations and/or captions, weighted by `generation_share`."""
  d = config.data
  sources = []
  if d.train:
    sources.append((mdata.ConversationSource(d.train, d.image_root), 1.0 - d.generation_share))
  if d.captions:
    sources.append((caption_data.CaptionSource(d.captions, d.image_root),
                    d.generation_share if d.train else 1.0))
  if len(sources) == 2 and 0.0 in (d.generation_share, 1.0):
    raise C.ConfigError(f"config.data.generation_share {d.generation_share} would leave one of "
                        "data.train / data.captions unused: set it in (0, 1) or unset one")
  return sources


def global_batch(batch: dict, mesh, abstract: bool = False) -> dict:
  """A host batch (numpy) -> global arrays split over the batch axes (host-only keys dropped);
  `abstract`: their shapes, dtypes and shardings only (`ShapeDtypeStruct`s)."""
  keys = mdata.ARRAY_KEYS + mdata.IMAGE_KEYS + mdata.CODE_KEYS
  make = data.global_array_spec if abstract else data.make_global_array
  return {k: make(np.asarray(batch[k]), mesh) for k in keys if k in batch}


def evaluate(eval_step, state, batches, mesh) -> dict:
  """Answer-token loss and accuracy, mean answer NLL per sample (summed over its answer
  tokens: compare with log(#answers) for a classification-style set) and exact match rate."""
  total = {"nll_sum": 0.0, "correct_sum": 0.0, "tokens": 0.0}
  rows_nll, rows_exact = [], []
  for batch in batches:
    out = jax.device_get(eval_step(state.params, state.tokenizer, global_batch(batch, mesh)))
    for k in total:
      total[k] += float(out[k])
    valid = np.asarray(out["row_valid"])
    rows_nll += list(np.asarray(out["row_nll"])[valid])
    rows_exact += list(np.asarray(out["row_exact"])[valid])
  tokens = max(total["tokens"], 1.0)
  return {"loss": total["nll_sum"] / tokens, "accuracy": total["correct_sum"] / tokens,
          "answer_nll": float(np.mean(rows_nll)), "exact_match": float(np.mean(rows_exact)),
          "samples": float(len(rows_nll))}
