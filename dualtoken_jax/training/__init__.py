"""Tokenizer training: recipe (stages), state, jitted step, checkpoints, metrics, the loop."""
