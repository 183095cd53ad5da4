"""Train the DualToken MLLM: alignment (projector), understanding SFT (projector + LLM),
generation (the two visual heads) or joint (everything, understanding + generation mixed).

  python -m dualtoken_jax.train_mllm --config configs/demo_mllm_cpu.py --workdir /tmp/demo
  python -m dualtoken_jax.train_mllm --config configs/mllm_tiny.py --workdir /tmp/mllm \
      --config.text.spm_model=tok.model --config.data.train=convs.json
  python -m dualtoken_jax.train_mllm --config configs/mllm_alignment.py:llm=qwen2.5_3b \
      --workdir gs://bucket/runs/align --config.init.llm_hf=/ckpt/Qwen2.5-3B-Instruct \
      --config.text.tokenizer=/ckpt/Qwen2.5-3B-Instruct/tokenizer.json \
      --config.init.tokenizer=/ckpt/dualtoken_l16 --config.data.train=llava_pretrain.json

Re-running the same command on an existing workdir resumes from its newest checkpoint (model,
optimiser, data position and skip counts); see `mllm/train.py`. After SIGTERM (preemption)
the run saves a checkpoint and exits with status 75 (`PREEMPTED_EXIT_CODE`).
"""

from dualtoken_jax.cli import training
from dualtoken_jax.mllm.train import train_and_evaluate

if __name__ == "__main__":
  training.run(train_and_evaluate, "checkpoints, metrics and logs")
