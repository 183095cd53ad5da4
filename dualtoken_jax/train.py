"""Train a DualToken tokenizer.

  python -m dualtoken_jax.train --config configs/demo_cpu.py --workdir /tmp/demo
  python -m dualtoken_jax.train --config configs/dualtoken_so400m.py:res=384,stage=1 \
      --workdir gs://bucket/runs/so400m_384 --config.data.path='gs://…/cc12m-train-{0000..2175}.tar'

Re-running the same command on an existing workdir resumes from its newest checkpoint. After
SIGTERM (preemption) the run saves a checkpoint and exits with status 75 (`PREEMPTED_EXIT_CODE`).
"""

from dualtoken_jax.cli import training
from dualtoken_jax.tokenizer_training.train import train_and_evaluate

if __name__ == "__main__":
  training.run(train_and_evaluate, "checkpoints, metrics and images")
