"""Evaluation: reconstruction metrics (the one FVU), delta LM loss by splicing, latent usage,
support overlap, sweeps of coders over L0 on the same tokens, the whole comparison, and what
latents respond to (the dashboards' content)."""

from saelab.evals.comparison import (
    CompareConfig,
    EvaluateConfig,
    compare,
    corpus_windows,
    read_comparison,
    score_dictionary,
    site_activations,
)
from saelab.evals.intervals import Interval, interval, paired_difference, resample_counts
from saelab.evals.latents import DashboardConfig, activations_of, context_of, latent_dashboard
from saelab.evals.metrics import LatentUsage, ReconstructionMetrics, fvu
from saelab.evals.overlap import jaccard, order_cosines, top_kept
from saelab.evals.splice import CleanPass, clean_pass, spliced_loss
from saelab.evals.store_codes import check_sae_fits_store, code_rows, coded_batches
from saelab.evals.sweep import (
    CODER_NAMES,
    BatchPasses,
    CoderName,
    CoderSpec,
    plan,
    run_sweep,
)
from saelab.evals.windows import METRICS, load_columns

__all__ = ["CODER_NAMES", "METRICS", "BatchPasses", "CleanPass", "CoderName", "CoderSpec",
           "CompareConfig", "DashboardConfig", "EvaluateConfig", "Interval", "LatentUsage",
           "ReconstructionMetrics", "activations_of", "check_sae_fits_store", "clean_pass",
           "code_rows", "coded_batches", "context_of",
           "compare", "corpus_windows", "fvu", "interval", "jaccard", "latent_dashboard",
           "load_columns", "order_cosines", "paired_difference", "plan", "read_comparison",
           "resample_counts", "run_sweep", "score_dictionary", "site_activations",
           "spliced_loss", "top_kept"]
