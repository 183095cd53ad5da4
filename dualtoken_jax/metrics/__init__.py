"""Evaluation metrics: FID statistics, PSNR/SSIM, codebook usage.

    from dualtoken_jax.metrics import GaussianStats, frechet_distance, psnr, ssim
    from dualtoken_jax.metrics import CodeHistogram, usage_stats

The FID feature extractor lives in `dualtoken_jax.models.inception`.
"""

from dualtoken_jax.metrics.codebook_stats import (CodeHistogram, histogram, histogram_jax,
                                                  stats_for_logging, usage_stats,
                                                  write_histogram_png, write_histogram_pngs)
from dualtoken_jax.metrics.fid import (GaussianStats, allgather_stats, fid_from_stats,
                                       frechet_distance, load_mu_sigma, sqrtm_product)
from dualtoken_jax.metrics.image_quality import (check_range, gaussian_window, psnr,
                                                 ssim)

__all__ = [
    "CodeHistogram", "GaussianStats", "allgather_stats", "check_range",
    "fid_from_stats", "frechet_distance", "gaussian_window", "histogram", "histogram_jax",
    "load_mu_sigma", "psnr", "sqrtm_product", "ssim", "stats_for_logging", "usage_stats",
    "write_histogram_png", "write_histogram_pngs",
]
