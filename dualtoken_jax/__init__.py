"""dualtoken-jax: DualToken (arXiv 2503.14324) in JAX/Flax.

    from dualtoken_jax import DualTokenizer, DualTokens
"""

from dualtoken_jax.tokenizer import DualTokenizer, DualTokens

__all__ = ["DualTokenizer", "DualTokens"]
__version__ = "0.1.0"
