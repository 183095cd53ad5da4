"""The text decoder family (Gemma 1/2/3, Qwen2/2.5, Llama 2/3): model, configs, generation
(checkpoints: bridges/gemma_*).

    from dualtoken_jax.llm import DecoderLM, get_config
    lm = DecoderLM.from_hf("path/to/Qwen2.5-3B")   # the family from config.json
    lm.generate(prompt_tokens, max_new_tokens=32)

`GemmaLM` is the same class as `DecoderLM` (its Gemma name); `GemmaDecoder` (= `Decoder`) is the
Linen module of every family.

The pieces a multimodal model builds on: `GemmaDecoder` (`embed_tokens`, `transform` over
embeddings with an attention mask, `compute_logits`), the mask helpers in `masks`
(`make_attn_mask` for prefix-LM), and `decoding.prefill` / `decoding.extend` for cached decoding.
"""

from dualtoken_jax.llm.config import ConfigError
from dualtoken_jax.llm.config import decoder_config
from dualtoken_jax.llm.config import FAMILIES
from dualtoken_jax.llm.config import gemma_config
from dualtoken_jax.llm.config import get_config
from dualtoken_jax.llm.config import VARIANTS
from dualtoken_jax.llm.gemma import Decoder
from dualtoken_jax.llm.gemma import GemmaDecoder
from dualtoken_jax.llm.lm import DecoderLM
from dualtoken_jax.llm.lm import GemmaLM

__all__ = ["ConfigError", "Decoder", "DecoderLM", "FAMILIES", "GemmaDecoder", "GemmaLM",
           "VARIANTS", "decoder_config", "gemma_config",
           "get_config"]
