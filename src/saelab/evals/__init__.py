"""Evaluation: reconstruction metrics, delta LM loss by splicing, latent usage, support
overlap, and sweeps of coders over L0 on the same tokens."""

from saelab.evals.metrics import LatentUsage, ReconstructionMetrics
from saelab.evals.overlap import jaccard, order_cosines, support, top_kept
from saelab.evals.splice import CleanPass, clean_pass, spliced_loss
from saelab.evals.sweep import CoderSpec, plan, run_sweep

__all__ = ["CleanPass", "CoderSpec", "LatentUsage", "ReconstructionMetrics", "clean_pass",
           "jaccard", "order_cosines", "plan", "run_sweep", "spliced_loss", "support",
           "top_kept"]
