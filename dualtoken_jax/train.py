"""Train a DualToken tokenizer.

  python -m dualtoken_jax.train --config configs/demo_cpu.py --workdir /tmp/demo
  python -m dualtoken_jax.train --config configs/dualtoken_so400m.py:res=384,stage=1 \
      --workdir gs://bucket/runs/so400m_384 --config.data.path='gs://…/cc12m-train-{0000..2175}.tar'

Re-running the same command on an existing workdir resumes from its newest checkpoint.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dualtoken_jax.training.loop import train_and_evaluate
from dualtoken_jax.training.loop_utils import quiet_orbax

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and images go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().python_handler.addFilter(quiet_orbax)
  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if result:
    logging.info("final evaluation: %s", result)


if __name__ == "__main__":
  app.run(main)
