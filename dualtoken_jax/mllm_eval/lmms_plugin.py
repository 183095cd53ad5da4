"""lmms-eval's model `dualtoken_jax`: a trained DualToken MLLM checkpoint on lmms-eval's tasks.

    pip install -e .[lmms]        # after a CPU (or CUDA) torch + matching torchvision: README
    python -m lmms_eval --model dualtoken_jax \
        --model_args checkpoint=workdirs/mllm,max_new_tokens=32 --tasks pope --batch_size 8

The only module that imports lmms-eval; lmms-eval finds it through the `lmms_eval.models` entry
point of this package (`manifest`), so nothing else depends on lmms-eval. All the work is in
`lmms_adapter.LmmsAdapter` (tested without lmms-eval); this class reads the model_args, loads
the checkpoint as `chat` does and hands it the requests. JAX runs on its own devices: the batch
is split over all local ones (lmms-eval's `--device` is not used, and the plugin is one
process: run lmms-eval without `accelerate launch`).

model_args: checkpoint (a train_mllm workdir or step directory, required), tokenizer (the text
tokenizer; default the run's copy), max_new_tokens (for tasks that set none; default 128),
length_bucket (32), seed (of sampled requests, 0), score (what `loglikelihood` returns: "nll",
the negated summed log-probability, since lmms-eval's multiple-choice scoring takes the argmin
as for its models' losses; "logprob" for the sign of lmms-eval's docstring / perplexity).
`--batch_size` is the rows per model call.
"""

from __future__ import annotations

from typing import List, Tuple

from lmms_eval.api import instance as lmms_instance
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger

# lmms-eval imports the class by the path `manifest` names; the entry point names `manifest`.
__all__ = ["DualTokenJax", "manifest"]

MODEL_NAME = "dualtoken_jax"


def manifest():
  """The entry point lmms-eval loads (group `lmms_eval.models`): this module's model, by name."""
  from lmms_eval.models.registry_v2 import ModelManifest
  return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.DualTokenJax")


def _survives_unwrap(pair: tuple[float, bool]):
  """`pair` as lmms-eval's evaluator passes it on to the task. lmms-eval 0.7.x's evaluator runs
  every response through `unwrap_generation_output`, which turns a (float, bool) pair into its
  string (and multiple-choice scoring then fails); it passes a `GenerationResult`'s text through
  untouched, so there the pair goes inside one. Versions that pass pairs get the pair."""
  unwrap = getattr(lmms_instance, "unwrap_generation_output", None)
  if unwrap is None or unwrap(pair)[0] == pair:
    return pair
  return lmms_instance.GenerationResult(text=pair)


class DualTokenJax(lmms):
  """lmms-eval's `lmms` interface over `LmmsAdapter` (module docstring)."""
  is_simple = True

  def __init__(self, checkpoint: str | None = None, tokenizer: str | None = None,
               max_new_tokens: int = 128, length_bucket: int = 32, seed: int = 0,
               score: str = "nll", batch_size: int | str = 8, max_batch_size: int | None = None,
               device: str | None = None, **unknown) -> None:
    super().__init__()
    if unknown:
      raise ValueError(f"unknown model_args for {MODEL_NAME}: {sorted(unknown)} (known: "
                       "checkpoint, tokenizer, max_new_tokens, length_bucket, seed, score)")
    if not checkpoint:
      raise ValueError(f"{MODEL_NAME} needs --model_args checkpoint=RUN (a train_mllm workdir"
                       " or checkpoint step directory)")
    try:
      batch_size = int(batch_size)
    except ValueError as e:
      raise ValueError(f"--batch_size must be a number for {MODEL_NAME}, got {batch_size!r}") from e
    # JAX is imported only when the model is built, not when lmms-eval lists its models.
    import jax

    from dualtoken_jax.mllm.inference import UnifiedModel
    from dualtoken_jax.mllm_eval.lmms_adapter import SCORES, LmmsAdapter, lmms_score
    from dualtoken_jax.parallel import sharding

    if score not in SCORES:
      raise ValueError(f"score={score!r}: one of {SCORES}")
    self.score = score
    self._lmms_score = lmms_score
    devices = jax.local_devices()
    batch_size = -(-max(batch_size, 1) // len(devices)) * len(devices)
    mesh = sharding.make_mesh({"data": len(devices)}, devices) if len(devices) > 1 else None
    model = UnifiedModel.from_checkpoint(checkpoint, tokenizer=tokenizer, mesh=mesh)
    self.adapter = LmmsAdapter(model, batch_size=batch_size, max_new_tokens=int(max_new_tokens),
                               length_bucket=int(length_bucket), mesh=mesh, seed=int(seed))
    self.batch_size = batch_size
    logger.info(f"{MODEL_NAME}: {checkpoint} on {len(devices)} device(s), batch {batch_size}")

  def _report_skips(self) -> None:
    if self.adapter.skipped:
      logger.warning(f"{MODEL_NAME}: images skipped so far {self.adapter.skipped} "
                     f"(answered '' / -inf), e.g. {self.adapter.examples}")

  def generate_until(self, requests: List[Instance]) -> List[str]:
    out = self.adapter.generate_until([r.args for r in requests], self.task_dict)
    self._report_skips()
    return out

  def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
    out = self.adapter.loglikelihood([r.args for r in requests], self.task_dict)
    self._report_skips()
    return [_survives_unwrap(self._lmms_score(pair, self.score)) for pair in out]

  def generate_until_multi_round(self, requests) -> List[str]:
    raise NotImplementedError(f"{MODEL_NAME} answers single-turn tasks (generate_until, "
                              "loglikelihood); multi-round tasks are not supported")
