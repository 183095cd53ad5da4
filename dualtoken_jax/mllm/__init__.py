"""The unified DualToken MLLM (paper section 3.3, spec D): dual-token image understanding and
generation on a Gemma-style decoder.

    python -m dualtoken_jax.train_mllm --config configs/demo_mllm_cpu.py --workdir DIR
    python -m dualtoken_jax.chat --checkpoint DIR --image cat.jpg --prompt "What is this?"
    python -m dualtoken_jax.generate --checkpoint DIR --prompt "a photo of a cat" --out cat.png

Modules: `config` (experiment and model configs, stages), `projector` (visual vectors and the
GELU projector), `depth_head` (the two depth-transformer visual heads), `model` (the Linen
module: decoder + projector + heads), `sequence` (vocabulary, conversation and caption layouts,
masks), `data` / `caption_data` (grain pipelines), `state` / `step` (training state and steps,
text + code loss), `generation` (the CFG sampling loop), `chat` (cached inference), `demo`.
"""

from dualtoken_jax.mllm.inference import UnifiedModel
from dualtoken_jax.mllm.model import DualTokenMLLM

__all__ = ["UnifiedModel", "DualTokenMLLM"]
