"""A tiny DualToken MLLM for CPU tests and the demo: the demo tokenizer at 32 px (4x4 = 16 image
positions, random weights unless `--config.init.tokenizer` is given) and a 2-layer width-64
Gemma-3-style decoder with every feature on (local/global layers, QK-norm, soft-caps).

Args (`configs/mllm_tiny.py:stage=alignment,visual=postquant,attention=prefix_lm`):
  stage      sft (projector + LLM train, default) | alignment (projector only) | generation
             (the two visual heads) | joint (everything)
  visual     code_embeddings (default) | postquant
  attention  causal (default) | prefix_lm
  vocab      LLM vocabulary rows (>= SentencePiece pieces + 2 appended image delimiters)
  llm        tiny (Gemma 3 style, default) | tiny_qwen2 | tiny_llama (2 layers, width 64; the
             BOS/EOS/pad ids of the test SentencePiece model)

Text and data are given on the command line: `--config.text.tokenizer=PATH` (SentencePiece
`.model` or HF `tokenizer.json`)
`--config.data.train=CONVERSATIONS.json` (`--config.eval.data=...` for a held-out set) and, for
generation, `--config.data.captions=CAPTIONS.json`.
"""

from dualtoken_jax import config_files
from dualtoken_jax.llm import config as llm_config
from dualtoken_jax.mllm import config as C


def get_config(arg=None):
  arg = config_files.parse_arg(arg, stage="sft", visual="code_embeddings", attention="causal",
                               vocab=128, llm="tiny")
  tokenizer = config_files.load("demo_cpu:test").model
  tokenizer.text = None  # the MLLM never runs the text tower
  if arg.llm == "tiny":
    llm = llm_config.get_config("tiny", vocab_size=arg.vocab, depth=2, mlp_dim=128,
                                sliding_window=16)
  else:
    llm = llm_config.get_config(arg.llm, vocab_size=arg.vocab, depth=2, mlp_dim=128, bos_id=2,
                                eos_ids=(1,), pad_id=0)
  heads = C.heads_config(width=64, num_heads=2, num_layers=2, dropout=0.0)
  model = C.model_config(llm, tokenizer, visual_vector=arg.visual, attention=arg.attention,
                         heads=heads)
  c = C.training_config(model, stage=arg.stage, batch_size=8, total_steps=300, lr=3e-3)
  c.text = C.text_config("", template=dict(user="{text}\n", model="{text}", append_eos=True))
  c.data.max_len = 64
  c.optimizer.warmup_steps = 20
  c.eval.every_steps = 100
  c.checkpoint = dict(every_steps=100, keep=2, async_save=False)
  c.log_every_steps = 10
  return c
