"""Score a trained DualToken MLLM on an understanding benchmark, read from local files.

  python -m dualtoken_jax.evaluate_mllm --checkpoint workdirs/mllm --task pope \
      --data eval/pope --images eval/pope/val2014 --workdir evals/pope
  python -m dualtoken_jax.evaluate_mllm --checkpoint workdirs/mllm --task seed \
      --data SEED-Bench/SEED-Bench.json --mode loglikelihood --workdir evals/seed_ll

  python -m dualtoken_jax.evaluate_mllm --checkpoint workdirs/mllm --task mjhq \
      --data MJHQ-30K/meta_data.json --inception_weights inception_fid.npz \
      --siglip_tokenizer spiece.model --workdir evals/mjhq

Understanding tasks: pope, mme, mmbench, seed, gqa, vqav2, textvqa (the files each expects:
`dualtoken_jax/mllm_eval/tasks.py`, README "MLLM benchmarks"). Greedy, KV-cached, batched
decoding with the batch split over all local devices; answers go to `WORKDIR/predictions.jsonl`
as they are made, so re-running the same command after an interruption answers only what is
missing; the scores go to `WORKDIR/metrics.json` and are printed as a short table.

Generation tasks: mjhq, geneval, genai_bench, dpg_bench (`mllm_eval/generation_tasks.py`):
images drawn with CFG into `WORKDIR/images/` in the layout each official scorer reads (a
re-run draws only the missing prompts), scored with the tokenizer's SigLIP towers (alignment;
needs its text tower and `--siglip_tokenizer`, or `--no_alignment`) and, for mjhq, FID against
the reference images (`--images`, default `DATA/../mjhq30k_imgs`).
"""

from __future__ import annotations

import argparse
import sys

import jax

from dualtoken_jax.cli import outputs
from dualtoken_jax.mllm.inference import UnifiedModel
from dualtoken_jax.mllm_eval import generation_runner, generation_tasks, runner, tasks
from dualtoken_jax.parallel import sharding


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m dualtoken_jax.evaluate_mllm", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="train_mllm workdir or checkpoint step dir")
  p.add_argument("--task", required=True,
                 choices=sorted(tasks.TASKS) + sorted(generation_tasks.TASKS))
  p.add_argument("--data", required=True, help="the task's question file or folder")
  p.add_argument("--images", help="image folder (default: the task's usual place near --data)")
  p.add_argument("--workdir", required=True, help="predictions.jsonl and metrics.json go here")
  p.add_argument("--prompt_style", default="llava", choices=tasks.STYLES,
                 help="llava: LLaVA's answer-format suffixes; plain: the bare question")
  p.add_argument("--mode", default="generate", choices=runner.MODES,
                 help="loglikelihood: rank the options (multiple-choice tasks)")
  p.add_argument("--batch_size", type=int, default=8,
                 help="rounded up to a multiple of the device count")
  p.add_argument("--max_new_tokens", type=int, default=None)
  p.add_argument("--limit", type=int, default=None, help="only the first N questions")
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--tokenizer", help="text tokenizer (default: the run's own copy)")
  g = p.add_argument_group("generation tasks")
  g.add_argument("--samples_per_prompt", type=int, default=None,
                 help="images per prompt (default: geneval and dpg_bench 4, others 1)")
  g.add_argument("--cfg_scale", type=float, default=3.0, help="guidance scale; 0 = no CFG")
  g.add_argument("--temperature", type=float, default=1.0)
  g.add_argument("--top_k", type=int, default=900, help="0 = off")
  g.add_argument("--top_p", type=float, default=0.96, help="1 = off")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--inception_weights", help="mjhq FID: .npz from convert_inception")
  g.add_argument("--siglip_tokenizer",
                 help="the SigLIP text tower's SentencePiece .model (alignment score)")
  g.add_argument("--no_alignment", action="store_true",
                 help="skip the SigLIP alignment score (a tokenizer without a text tower)")
  args = p.parse_args(argv)
  outputs.check(p, "--workdir", args.workdir, directory=True)
  devices = jax.local_devices()
  batch_size = -(-max(args.batch_size, 1) // len(devices)) * len(devices)
  try:
    mesh = sharding.make_mesh({"data": len(devices)}, devices) if len(devices) > 1 else None
    model = UnifiedModel.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer,
                                         mesh=mesh)
    if args.task in generation_tasks.TASKS:
      generation_runner.evaluate(
          model, args.task, args.data, args.workdir, images=args.images,
          samples_per_prompt=args.samples_per_prompt, batch_size=batch_size,
          cfg_scale=args.cfg_scale or None, temperature=args.temperature,
          top_k=args.top_k or None, top_p=args.top_p, seed=args.seed, limit=args.limit,
          inception_weights_path=args.inception_weights,
          siglip_tokenizer=args.siglip_tokenizer, alignment_score=not args.no_alignment,
          mesh=mesh, progress=not args.no_progress, checkpoint=args.checkpoint)
    else:
      runner.evaluate(model, args.task, args.data, args.workdir, images=args.images,
                      style=args.prompt_style, mode=args.mode, batch_size=batch_size,
                      max_new_tokens=args.max_new_tokens, limit=args.limit, mesh=mesh,
                      progress=not args.no_progress, checkpoint=args.checkpoint)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
