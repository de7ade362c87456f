"""`saelab dashboard`: what a sample of an SAE's latents respond to under any coder
(`saelab.evals.latents` does the work; `saelab.reports.dashboard` draws the page)."""

from __future__ import annotations

from typing import Any

from saelab.config import Verb
from saelab.evals import DashboardConfig, latent_dashboard


def dashboard_summary(result: dict[str, Any]) -> list[str]:
    shown = ", ".join(str(entry["latent"]) for entry in result["latents"])
    method = result["method"] + (f" k={result['k']}" if result["k"] else "")
    return [f"{len(result['latents'])} latents ({shown}) coded by {method} on "
            f"{result['tokens']} tokens; {result['firing_latents']} of {result['n_latents']} "
            f"fire -> {result['out']}"]


VERB = Verb(DashboardConfig, latent_dashboard, dashboard_summary, "Show what a sample of an "
            "SAE's latents respond to under any coder: firing rates, top contexts, logit "
            "effects (dashboard.html, latents.json).")
