"""Evaluation: reconstruction metrics (the one FVU), delta LM loss by splicing, latent usage,
support overlap, sweeps of coders over L0 on the same tokens, the whole comparison, and what
latents respond to (the dashboards' content)."""

from saelab.evals.comparison import (
    CompareConfig,
    EvaluateConfig,
    compare,
    corpus_windows,
    site_activations,
)
from saelab.evals.latents import DashboardConfig, latent_dashboard
from saelab.evals.metrics import LatentUsage, ReconstructionMetrics, fvu
from saelab.evals.overlap import jaccard, order_cosines, top_kept
from saelab.evals.splice import CleanPass, clean_pass, spliced_loss
from saelab.evals.store_codes import check_sae_fits_store, coded_batches
from saelab.evals.sweep import CoderSpec, plan, run_sweep

__all__ = ["CleanPass", "CoderSpec", "CompareConfig", "DashboardConfig", "EvaluateConfig",
           "LatentUsage", "ReconstructionMetrics", "check_sae_fits_store", "clean_pass",
           "coded_batches", "compare", "corpus_windows", "fvu", "jaccard", "latent_dashboard",
           "order_cosines", "plan", "run_sweep", "site_activations", "spliced_loss",
           "top_kept"]
