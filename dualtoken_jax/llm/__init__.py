"""Gemma-style text decoder (Gemma 1/2/3): model, configs, generation (checkpoints: bridges/gemma_*).

    from dualtoken_jax.llm import GemmaLM, get_config
    lm = GemmaLM.from_hf("path/to/gemma-3-1b")
    lm.generate(prompt_tokens, max_new_tokens=32)

The pieces a multimodal model builds on: `GemmaDecoder` (`embed_tokens`, `transform` over
embeddings with an attention mask, `compute_logits`), the mask helpers in `masks`
(`make_attn_mask` for prefix-LM), and `decoding.prefill` / `decoding.extend` for cached decoding.
"""

from dualtoken_jax.llm.config import ConfigError
from dualtoken_jax.llm.config import config_from_hf
from dualtoken_jax.llm.config import config_to_hf
from dualtoken_jax.llm.config import gemma_config
from dualtoken_jax.llm.config import get_config
from dualtoken_jax.llm.config import VARIANTS
from dualtoken_jax.llm.gemma import GemmaDecoder
from dualtoken_jax.llm.lm import GemmaLM

__all__ = ["ConfigError", "GemmaDecoder", "GemmaLM", "VARIANTS", "config_from_hf",
           "config_to_hf", "gemma_config", "get_config"]
