"""MLLM stage 1, alignment (paper Table "hyper_params"): only the projector trains (lr 1e-3,
batch 64), the decoder and the DualToken tokenizer are frozen. The paper's model, Qwen2.5-3B
(HF directory; the template is its ChatML, the text tokenizer its tokenizer.json):

  python -m dualtoken_jax.train_mllm --config configs/mllm_alignment.py:llm=qwen2.5_3b \
      --workdir WORKDIR --config.init.llm_hf=/ckpt/Qwen2.5-3B-Instruct \
      --config.init.tokenizer=/ckpt/tok \
      --config.text.tokenizer=/ckpt/Qwen2.5-3B-Instruct/tokenizer.json \
      --config.data.train=blip_558k.json --config.data.image_root=/data/images

Gemma: `:llm=gemma2_2b --config.init.llm_orbax=/ckpt/gemma2_2b
--config.text.tokenizer=/ckpt/tokenizer.model` (SentencePiece); Llama 2: `:llm=llama2_7b`.

Args: llm (a `dualtoken_jax.llm` variant: qwen2.5_3b (the default, the paper's), qwen2.5_7b,
llama2_7b, llama3_8b, gemma2_2b, ...; each brings its chat template and special tokens), tokenizer
(a tokenizer config, default dualtoken_siglip_l16: 256 px, 16x16 = 256 image positions, D = 4;
dualtoken_so400m for the 384 px variant), visual (code_embeddings | postquant), attention
(causal | prefix_lm), head_width (0 = the LLM width; see `mllm.config.paper_stage`).
"""

from dualtoken_jax.mllm import config as C


def get_config(arg=None):
  return C.paper_stage(arg, "alignment", total_steps=8_720, max_len=512)  # 558k samples, 1 epoch
