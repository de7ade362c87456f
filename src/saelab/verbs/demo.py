"""`saelab demo`: the embedded default end to end, in four stages: cache activations of
Gemma 3 270M on the built-in corpus, train a TopK SAE on them, compare the encoder with
inference-time optimisation (non-negative pursuits, as the encoder's code and the published
ITO are) on held-out text, and draw dashboards of a sample of latents under the encoder and
under non-negative gradient pursuit; then say where the report is.

Every stage keeps its output in the demo folder and is a library call (the same the verbs
make). The first three are reused when the demo runs again with the same settings (the cache
and the SAE resume; a finished comparison is read back); the dashboards, which take seconds,
are drawn again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.activations import cache_activations
from saelab.config import Verb, say
from saelab.evals import CompareConfig, DashboardConfig, compare, latent_dashboard
from saelab.io import write_json
from saelab.lm import EMBEDDED_MODEL
from saelab.reports import answer
from saelab.training import TrainConfig, train

SITE = "blocks.6.hook_resid_post"


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    """Folder for everything the demo writes; re-running reuses what is already there."""
    quick: bool = False
    """Smaller settings that finish in a couple of minutes (what CI runs)."""


@dataclass(frozen=True)
class _Settings:
    cache_tokens: int
    context_size: int
    n_latents: int
    k: int
    train_tokens: int
    batch_size: int
    lr_warmup_steps: int
    eval_tokens: int
    fit_tokens: int
    ks: tuple[int, ...]
    dashboard_tokens: int
    dashboard_latents: int


FULL = _Settings(cache_tokens=200_000, context_size=128, n_latents=4096, k=32,
                 train_tokens=1_000_000, batch_size=4096, lr_warmup_steps=20,
                 eval_tokens=4096, fit_tokens=4096, ks=(8, 16, 32, 64), dashboard_tokens=50_000,
                 dashboard_latents=12)
QUICK = _Settings(cache_tokens=8_000, context_size=64, n_latents=1024, k=16,
                  train_tokens=48_000, batch_size=1000, lr_warmup_steps=10, eval_tokens=252,
                  fit_tokens=504, ks=(8, 16), dashboard_tokens=4_000,
                  dashboard_latents=4)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the four stages; return the comparison's results."""
    s = QUICK if cfg.quick else FULL
    seconds: dict[str, float] = {}
    say(f"saelab demo{' --quick' if cfg.quick else ''}: {EMBEDDED_MODEL}, built-in corpus, "
         f"{SITE} -> {cfg.out}")
    with _stage(seconds, "cache", f"1/4 cache {s.cache_tokens} tokens of activations"):
        store = cache_activations(cfg.out / "activations", sites=(SITE,),
                                  tokens=s.cache_tokens, context_size=s.context_size)[SITE]
    with _stage(seconds, "train", f"2/4 train a TopK SAE: {s.n_latents} latents, k={s.k}, "
                f"{s.train_tokens} tokens"):
        train(TrainConfig(architecture="topk", n_latents=s.n_latents, k=s.k,
                          tokens=s.train_tokens, batch_size=s.batch_size,
                          lr_warmup_steps=s.lr_warmup_steps), store, cfg.out / "sae")
    with _stage(seconds, "compare", f"3/4 compare coders on {s.eval_tokens} held-out tokens "
                f"at k={list(s.ks)}"):
        results = compare(CompareConfig(
            sae=str(cfg.out / "sae"), out=cfg.out / "compare", model=EMBEDDED_MODEL,
            site=SITE, tokens=s.eval_tokens, fit_tokens=s.fit_tokens,
            context_size=s.context_size, k=s.ks,
            skip_tokens=store.manifest["n_windows"] * (s.context_size - 1)))
    for sentence in answer(results):
        say("  " + sentence)
    with _stage(seconds, "inspect", f"4/4 dashboards of {s.dashboard_latents} latents under the "
                f"encoder and under nn-gp (k={s.k}), on {s.dashboard_tokens} tokens"):
        dashboards = _dashboards(cfg.out, store.path, s)
    write_json(cfg.out / "timings.json", seconds)
    say("stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) +
         f"; total {sum(seconds.values()):.0f} s")
    say(f"report: {cfg.out / 'compare' / 'report.html'}; dashboards: "
         + ", ".join(str(path) for path in dashboards))
    return results


def _dashboards(out: Path, activations: Path, s: _Settings) -> list[Path]:
    """The same latents (drawn from those the encoder fires) under the encoder and under
    non-negative gradient pursuit at the SAE's k, so the two pages can be read side by side."""
    common = {"sae": str(out / "sae"), "activations": activations,
              "tokens": s.dashboard_tokens}
    encoder = latent_dashboard(DashboardConfig(out=out / "dashboard-encoder",
                                               sample=s.dashboard_latents, **common))
    latents = tuple(entry["latent"] for entry in encoder["latents"])
    latent_dashboard(DashboardConfig(out=out / "dashboard-nn-gp", method="nn-gp", k=s.k,
                                     latents=latents, **common))
    return [out / f"dashboard-{name}" / "dashboard.html" for name in ("encoder", "nn-gp")]


@contextmanager
def _stage(seconds: dict[str, float], name: str, message: str) -> Iterator[None]:
    say(message)
    began = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - began


VERB = Verb(DemoConfig, run_demo, lambda _: [], "The embedded default end to end: cache Gemma 3 "
            "270M activations, train a TopK SAE, compare the encoder with ITO, draw dashboards; "
            "print where the report is.")
