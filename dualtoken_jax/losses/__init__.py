"""Training losses as pure functions: `gan` (the discriminator's hinge loss, the adaptive weight)
and `semantic` (distillation from the frozen SigLIP teacher). The pixel terms (MSE, LPIPS, −D(x̂))
are computed in batch chunks by `tokenizer_training.pixel_loss`; the commitment losses live with
the quantiser, in `quantization/residual.py`."""
