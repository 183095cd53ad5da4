"""Tokenizer evaluation: rFID, PSNR, SSIM, LPIPS, codebook usage, zero-shot, retrieval.

    from dualtoken_jax.evaluation import EvalOptions, evaluate
    results = evaluate(tokenizer, "folder:/data/imagenet/val", "/tmp/eval",
                       EvalOptions(metrics=("rfid", "psnr", "ssim", "usage"),
                                   inception_weights="inception_fid.npz"))

Modules: `runner` (the streaming, resumable pass), `steps` (the jitted device step),
`state` (accumulators and checkpoints), `report` (metrics.json, CSV, PNGs), `data_spec`
(`--data` specs, labels, captions), `text` (SigLIP tokenisation), `zeroshot`, `retrieval`,
`imagenet_classes`. The command line is `python -m dualtoken_jax.evaluate`.
"""

from dualtoken_jax.evaluation.runner import DEFAULT_METRICS, METRICS, EvalOptions, evaluate

__all__ = ["DEFAULT_METRICS", "METRICS", "EvalOptions", "evaluate"]
