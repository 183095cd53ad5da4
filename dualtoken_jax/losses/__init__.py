"""Training losses as pure functions: `gan` (discriminator/generator terms, adaptive weight),
`semantic` (distillation from the frozen SigLIP teacher) and `reconstruction` (pixel MSE, LPIPS).
The commitment losses live with the quantiser, in `quantization/residual.py`."""
