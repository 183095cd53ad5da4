"""Training infrastructure both trainers share: state set-up, the step loop, checkpoints, metrics,
optimisers and freezing. The recipes live in `tokenizer_training/` and `mllm/train.py`."""
