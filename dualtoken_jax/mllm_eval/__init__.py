"""MLLM benchmarks: official-rule scoring (`scoring`), the benchmarks' file layouts and prompts
(`tasks`), and the resumable batched runner (`runner`, `python -m dualtoken_jax.evaluate_mllm`)."""
