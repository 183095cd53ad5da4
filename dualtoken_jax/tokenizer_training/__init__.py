"""The DualToken tokenizer's training recipe (spec B): state, step, pixel terms, stages, inputs."""
