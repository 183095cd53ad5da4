"""The MLLM demo: a tiny unified DualToken MLLM learns both directions on the ten photos bundled
with scikit-image / scikit-learn / matplotlib, on 2 CPU cores in minutes.

  python -m dualtoken_jax.train_mllm --config configs/demo_mllm_cpu.py --workdir workdirs/mllm_demo

It trains understanding ("What is in this picture?" -> "a cat") and generation ("a photo of a
cat" -> the photo's 8x8 pixel + semantic codes) jointly (stage 4 layout, half the samples each),
then writes `WORKDIR/demo_report.json` (understanding_accuracy, generation_accuracy, chance) and
`WORKDIR/demo_generations.png` (caption | generated | the photo decoded from its own codes |
nearest photo); see
`dualtoken_jax/mllm/demo.py` for how both are measured.

The tokenizer has the architecture of the tokenizer demo (configs/demo_cpu.py, 64 px) and is
random unless given: after README command 1, `--config.init.tokenizer=workdirs/demo` uses the
trained demo tokenizer, so generated images decode to (blurry) photos instead of noise.
The model memorises ten photos; that is the point of a demo, not a result.
"""

from dualtoken_jax import config_files
from dualtoken_jax.llm import config as llm_config
from dualtoken_jax.mllm import config as C


def get_config(arg=None):
  # `:test` uses the 32 px test tokenizer (4x4 image positions): the same run, faster, for CI.
  arg = config_files.parse_arg(arg, steps=300, test=False)
  tokenizer = config_files.load("demo_cpu:test" if arg.test else "demo_cpu").model
  llm = llm_config.get_config("tiny", vocab_size=128, width=128, depth=2, num_heads=4,
                              num_kv_heads=2, head_dim=32, mlp_dim=256, sliding_window=128)
  heads = C.heads_config(width=128, num_heads=4, num_layers=2, dropout=0.0)
  model = C.model_config(llm, tokenizer, heads=heads)
  c = C.training_config(model, stage="joint", batch_size=16, total_steps=arg.steps, lr=3e-3)
  c.text = C.text_config("", template=dict(user="{text}\n", model="{text}", append_eos=True))
  c.data.max_len = 48 if arg.test else 96
  c.data.caption_dropout = 0.1
  c.optimizer.warmup_steps = 20
  c.eval.every_steps = 50
  c.checkpoint = dict(every_steps=100, keep=2, async_save=False)
  c.log_every_steps = 20
  c.demo = True
  return c
