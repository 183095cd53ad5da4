"""Ask a trained DualToken MLLM about an image.

  python -m dualtoken_jax.chat --checkpoint workdirs/mllm --image cat.jpg \
      --prompt "What is in this picture?"
  python -m dualtoken_jax.chat --checkpoint workdirs/mllm/checkpoints/3000 --image cat.jpg \
      --prompt "Describe the image." --temperature 0.7 --top_p 0.9 --seed 1

`--checkpoint` is a `train_mllm` workdir (its newest checkpoint), its `checkpoints/`
directory, or one step directory. Greedy decoding unless `--temperature` > 0; the prompt is
prefilled into the KV cache and every new token is one cached step.
"""

from __future__ import annotations

import argparse
import sys

from dualtoken_jax.mllm.inference import UnifiedModel


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.chat", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="train_mllm workdir or checkpoint step dir")
  p.add_argument("--image", help="an image file (omit for a text-only prompt)")
  p.add_argument("--prompt", required=True, help="the question or instruction")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top_k", type=int, default=None)
  p.add_argument("--top_p", type=float, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tokenizer", "--spm_model", dest="spm_model",
                 help="text tokenizer: a SentencePiece .model or a HF tokenizer.json (default: "
                      "the run's own copy)")
  args = p.parse_args(argv)
  try:
    model = UnifiedModel.from_checkpoint(args.checkpoint, spm_model=args.spm_model)
    print(model.answer(args.prompt, args.image, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed))
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
