"""What a sample of an SAE's latents respond to, under any coder (`saelab dashboard`).

For each latent shown: how often it fires and how strongly (with a histogram), the stored
contexts where it fires most (every token shaded by the latent's activation there), and its
direct logit effect, the tokens its decoder direction most promotes and suppresses through
the unembedding. The code comes from the coder asked for (`--method`), so the same latent
can be read under its SAE's encoder and under gradient pursuit. Writes latents.json and a
self-contained dashboard.html.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.activations import ActivationStore
from saelab.coding import Coder, SparseCode
from saelab.errors import SaelabError
from saelab.evals.store_codes import check_sae_fits_store, code_rows
from saelab.evals.sweep import CoderName, CoderSpec
from saelab.formats import load_sae
from saelab.io import write_json
from saelab.lm import LanguageModel, load_model
from saelab.reports import write_dashboard

log = logging.getLogger(__name__)

AFTER = 3  # tokens shown after a context's top token
HISTOGRAM_BINS = 20


@dataclass(frozen=True, kw_only=True)
class DashboardConfig:
    sae: str
    """The SAE: a folder or file in any layout saelab reads, hf://OWNER/REPO/PATH, or
    RELEASE:SAE_ID (a SAELens release)."""
    activations: Path
    """Activation store from `saelab cache` (OUT or OUT/SITE); its model gives the tokenizer
    and the unembedding."""
    out: Path
    """Folder for dashboard.html and latents.json."""
    method: CoderName = "encoder"
    """Coder whose code the dashboard shows: the SAE's encoder (or its support refitted), or
    a pursuit on its dictionary; `nn-` first: non-negative (nn-gp). (encoder-scaled needs a
    fitted scale: not offered here.)"""
    k: int | None = None
    """Latents per token for mp, gp and omp."""
    tokens: int = 20000
    """Code the first N rows of the store; top contexts come from these."""
    latents: tuple[int, ...] = ()
    """Latents to show; default: --sample latents drawn at random from those that fire on
    the coded rows."""
    sample: int = 16
    """How many latents to draw when --latents is not given."""
    seed: int = 0
    """Seed of that draw."""
    contexts: int = 8
    """Top-activating contexts per latent."""
    window: int = 12
    """Tokens shown before each context's top token (and 3 after it)."""
    logit_tokens: int = 10
    """Tokens listed on each side of the direct logit effect."""
    batch_size: int = 4096
    """Rows coded at once."""
    device: str = "cpu"
    """Device to code on: cpu, cuda, cuda:1, ..."""
    allow_mismatch: bool = False
    """Code the store even if the SAE was trained at another site or on another model."""

    def __post_init__(self) -> None:
        if self.method == "encoder-scaled":
            raise SaelabError("the dashboard does not fit scales",
                              expected="encoder, encoder-refit, mp, gp or omp",
                              found="encoder-scaled",
                              fix="use encoder: the scaled code fires on the same latents")


def latent_dashboard(cfg: DashboardConfig) -> dict[str, Any]:
    """Code the store, pick the latents, gather their statistics, contexts and logit
    effects; write latents.json and dashboard.html; return what latents.json holds."""
    store = ActivationStore(cfg.activations)
    sae = load_sae(cfg.sae, device=cfg.device, input_scale=store.normalisation["norm_scale"])
    check_sae_fits_store(sae, store, allow_mismatch=cfg.allow_mismatch)
    n = min(cfg.tokens, len(store))
    spec = CoderSpec.named(cfg.method)
    code = code_rows(store, Coder(sae, spec.coder, k=cfg.k, nonnegative=spec.nonnegative), n,
                     cfg.batch_size, cfg.device, cfg.method)
    counts_L = code.firing_counts(sae.n_latents)
    chosen = _choose(cfg, counts_L)
    acts_BA = activations_of(code, chosen, sae.n_latents)
    lm = load_model(store.model)
    latents = [_latent(int(i), acts_BA[:, j], store, lm, cfg) for j, i in enumerate(chosen)]
    W_dec = sae.W_dec.detach()
    effects = logit_effects(W_dec[chosen.to(W_dec.device)].float().cpu(), lm, cfg.logit_tokens)
    for entry, effect in zip(latents, effects or [None] * len(latents), strict=True):
        entry["logit_effect"] = effect
    result = {"sae": cfg.sae, "activations": str(store.path), "model": store.model,
              "site": store.site, "method": cfg.method, "k": cfg.k, "tokens": n,
              "n_latents": sae.n_latents, "firing_latents": int((counts_L > 0).sum()),
              "latents": latents, "out": str(cfg.out / "dashboard.html")}
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_json(cfg.out / "latents.json", result)
    write_dashboard(result, cfg.out / "dashboard.html")
    return result


def _choose(cfg: DashboardConfig, counts_L: Tensor) -> Tensor:
    """The latents to show: those asked for, or a seeded random draw of the firing ones."""
    n_latents = len(counts_L)
    if cfg.latents:
        bad = [i for i in cfg.latents if not 0 <= i < n_latents]
        if bad:
            raise SaelabError("no such latent", expected=f"latents in 0..{n_latents - 1}",
                              found=f"--latents {', '.join(map(str, bad))}",
                              fix="pick latents of this SAE, or leave --latents out to draw "
                              "a sample")
        return torch.tensor(sorted(set(cfg.latents)))
    firing = counts_L.nonzero().squeeze(1)
    if not len(firing):
        raise SaelabError("no latent fires on the coded rows", expected="some non-zero code",
                          found=f"all-zero codes on {cfg.tokens} rows",
                          fix="code more rows (--tokens) or check the SAE matches the store")
    draw = torch.randperm(len(firing), generator=torch.Generator().manual_seed(cfg.seed))
    return firing[draw[:cfg.sample]].sort().values


def activations_of(code: SparseCode, latents_A: Tensor, n_latents: int) -> Tensor:
    """Dense activations [tokens, A] of a few latents, from a sparse code (no [tokens,
    n_latents] matrix: each slot is looked up in a latent -> column table)."""
    column_L = torch.full((n_latents,), -1, dtype=torch.long)
    column_L[latents_A] = torch.arange(len(latents_A))
    column_BK = column_L[code.indices]
    keep_BK = (column_BK >= 0) & (code.values != 0)
    rows_BK = torch.arange(len(code))[:, None].expand_as(column_BK)
    acts_BA = code.values.new_zeros(len(code), len(latents_A))
    acts_BA.index_put_((rows_BK[keep_BK], column_BK[keep_BK]), code.values[keep_BK],
                       accumulate=True)
    return acts_BA


def _latent(latent: int, acts_B: Tensor, store: ActivationStore, lm: LanguageModel,
            cfg: DashboardConfig) -> dict[str, Any]:
    """One latent's statistics and top contexts."""
    fired_B = acts_B != 0
    fired = acts_B[fired_B]
    hi = float(fired.abs().max()) if len(fired) else 0.0
    counts, edges = (torch.histogram(fired.double(), bins=HISTOGRAM_BINS) if len(fired)
                     else (torch.zeros(0), torch.zeros(0)))
    top = acts_B.abs().topk(min(cfg.contexts, len(acts_B)))
    contexts = [context_of(int(row), acts_B, store, lm, cfg.window)
                for value, row in zip(top.values, top.indices, strict=True) if value > 0]
    return {"latent": latent, "frequency": float(fired_B.double().mean()),
            "fires": int(fired_B.sum()),
            "mean_when_firing": float(fired.double().mean()) if len(fired) else 0.0,
            "max_abs": hi, "histogram": {"counts": counts.long().tolist(),
                                         "edges": edges.tolist()},
            "contexts": contexts}


def context_of(row: int, acts_B: Tensor | None, store: ActivationStore, lm: LanguageModel,
               window: int) -> dict[str, Any]:
    """The tokens around row's token (`window` before, AFTER after; `top` marks row's own),
    each with the latent's activation where it was coded (None before the window's first
    stored position, past the coded rows, or everywhere when `acts_B` is None: a context
    shown without shading)."""
    ctx = store.context(row)
    first_stored = store.context_size - store.rows_per_window
    positions = range(max(ctx.position - window, 0),
                      min(ctx.position + AFTER + 1, len(ctx.token_ids)))
    tokens = []
    for p in positions:
        other = row + p - ctx.position
        coded = acts_B is not None and p >= first_stored and 0 <= other < len(acts_B)
        tokens.append({"text": lm.tokenizer.decode([ctx.token_ids[p]]),
                       "id": int(ctx.token_ids[p]),
                       "activation": float(acts_B[other]) if coded and acts_B is not None
                       else None,
                       "top": p == ctx.position})
    return {"row": row, "window": ctx.window, "position": ctx.position,
            "activation": float(acts_B[row]) if acts_B is not None else None,
            "tokens": tokens}


def logit_effects(directions_AD: Tensor, lm: LanguageModel, m: int
                  ) -> list[dict[str, list[dict[str, Any]]]] | None:
    """Each direction's direct logit effect, W_U d: the m tokens it most promotes and the m
    it most suppresses. The direct path only: later layers and the final norm's
    per-dimension scale are left out, so this ranks tokens, it does not predict logits.
    None when the model has no unembedding, or its width is not the directions' (a site off
    the residual stream)."""
    head = lm.hf_model.get_output_embeddings()
    if head is None:
        log.warning("no logit effects: %s has no unembedding", lm.name)
        return None
    W_U = head.weight.detach().float().cpu()
    if W_U.shape[1] != directions_AD.shape[1]:
        log.warning("no logit effects: the unembedding reads width %d, the latents write %d",
                    W_U.shape[1], directions_AD.shape[1])
        return None
    effect_AV = directions_AD @ W_U.T
    m = min(m, effect_AV.shape[1])
    up, down = effect_AV.topk(m, dim=1), effect_AV.topk(m, dim=1, largest=False)

    def listed(values: Tensor, ids: Tensor) -> list[dict[str, Any]]:
        return [{"text": lm.tokenizer.decode([int(i)]), "id": int(i), "effect": float(v)}
                for v, i in zip(values, ids, strict=True)]

    return [{"promotes": listed(up.values[s], up.indices[s]),
             "suppresses": listed(down.values[s], down.indices[s])}
            for s in range(len(effect_AV))]
