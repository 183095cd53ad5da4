"""Train the DualToken MLLM: alignment (projector), understanding SFT (projector + LLM),
generation (the two visual heads) or joint (everything, understanding + generation mixed).

  python -m dualtoken_jax.train_mllm --config configs/demo_mllm_cpu.py --workdir /tmp/demo
  python -m dualtoken_jax.train_mllm --config configs/mllm_tiny.py --workdir /tmp/mllm \
      --config.text.spm_model=tok.model --config.data.train=convs.json
  python -m dualtoken_jax.train_mllm --config configs/mllm_alignment.py:llm=gemma2_2b \
      --workdir gs://bucket/runs/align --config.init.llm_orbax=/ckpt/gemma2-2b \
      --config.init.tokenizer=/ckpt/dualtoken_l16 --config.data.train=llava_pretrain.json

Re-running the same command on an existing workdir resumes from its newest checkpoint (model,
optimiser, data position and skip counts); see `mllm/train.py`. After SIGTERM (preemption)
the run saves a checkpoint and exits with status 75 (`PREEMPTED_EXIT_CODE`).
"""

from __future__ import annotations

import sys

from absl import app, flags
from absl import logging
from ml_collections import config_flags

from dualtoken_jax.cli import logs
from dualtoken_jax.training.loop import PREEMPTED_EXIT_CODE, Preempted
from dualtoken_jax.mllm.train import train_and_evaluate


def define_flags() -> None:
  """--config (a config file, `--config.x.y=...` overrides) and --workdir. Defined when run as a
  program, not on import, so that importing this module has no side effects."""
  config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
  flags.DEFINE_string("workdir", None, "where checkpoints, metrics and logs go")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logs.setup()
  try:
    result = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except Preempted as e:  # checkpoint saved: re-running the same command resumes
    logging.warning("%s", e)
    sys.exit(PREEMPTED_EXIT_CODE)
  if result:
    logging.info("final evaluation: %s", result)


if __name__ == "__main__":
  define_flags()
  app.run(main)
