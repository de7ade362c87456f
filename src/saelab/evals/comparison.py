"""Coders on one SAE's dictionary, on the same tokens (`saelab compare` and `evaluate`).

Windows come from a corpus (skipping the first `skip_tokens`, so that a demo evaluates on
text its SAE was not trained on); the first `fit_tokens` of them (rounded up to whole
windows) are held out to fit the encoder-scaled coder and to measure the encoder's L0, which
the pursuits are matched to. The run folder gets config.json (the run file: a folder holds
one comparison, and a finished one is read back), results.json, the plots and report.html.
Under torchrun every rank scores its slice of the windows (see `sweep`) and rank 0 writes.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saelab.coding import PURSUIT_METHODS, Coder, fit_scale
from saelab.corpus import BUILTIN_CORPUS, iter_documents, token_windows
from saelab.distributed import join_world
from saelab.errors import SaelabError
from saelab.evals.sweep import BatchPasses, CoderName, CoderSpec, plan, run_sweep
from saelab.evals.windows import save_columns
from saelab.formats import load_sae
from saelab.io import read_json, record_run, to_json, write_json
from saelab.lm import EMBEDDED_MODEL, LanguageModel, load_model
from saelab.reports import write_plots, write_report
from saelab.saes import SAE

log = logging.getLogger(__name__)
RESULTS = "results.json"
WINDOWS = "windows.npz"  # the per-window sums the intervals were drawn from


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    sae: str
    """SAE to evaluate: a folder in any supported layout, or a hub spec (`saelab info` shows it)."""
    out: Path
    """Run folder: config.json, results.json, plots (PNG and SVG) and report.html."""
    model: str = EMBEDDED_MODEL
    """Model the SAE reads: gemma-3-270m, a .gguf file, a local Hugging Face folder or a hub id."""
    site: str | None = None
    """Site to code and splice (default: the SAE's own, from its config)."""
    corpus: str = BUILTIN_CORPUS
    """Text: python-docs (built-in), a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG][@SPLIT]."""
    text_column: str = "text"
    """Column holding the text, for .jsonl, .parquet and Hugging Face datasets."""
    tokens: int = 8192
    """Tokens to code and score (BOS positions excluded)."""
    context_size: int = 128
    """Tokens per window, BOS included."""
    skip_tokens: int = 0
    """Corpus tokens to skip first (e.g. those the SAE was trained on)."""
    fit_tokens: int = 4096
    """Held-out tokens before the evaluated ones: the encoder-scaled fit and the encoder's L0."""
    batch_tokens: int = 1024
    """Tokens per forward pass (the clean log-probs of a batch are kept for the KL)."""
    device: str = "cpu"
    """Device for the model, the SAE and the coders (cpu, cuda, cuda:1, ...)."""
    seed: int = 0
    """Seed for anything random (the coders themselves are deterministic)."""


@dataclass(frozen=True, kw_only=True)
class CompareConfig(EvalOptions):
    coders: tuple[CoderName, ...] = ("encoder", "encoder-refit", "encoder-scaled", "nn-mp",
                                     "nn-gp", "nn-omp")
    """Coders to compare; `nn-` first: the non-negative variant (activations >= 0, as the
    encoder's and as in the Gated SAE paper's ITO), without: signed."""
    k: tuple[int, ...] = (8, 16, 32, 64)
    """L0s to sweep the pursuits over; each pursuit also runs at the encoder's own L0."""


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(EvalOptions):
    coder: CoderName = "encoder"
    """Coder: the SAE's encoder, its support refitted, its code rescaled, or matching /
    gradient / orthogonal matching pursuit; `nn-` first: non-negative."""
    k: int | None = None
    """Latents per token for mp, gp and omp (default: the encoder's L0, rounded)."""


def compare(cfg: CompareConfig | EvaluateConfig) -> dict[str, Any]:
    """Run the comparison (or one evaluation), write everything, return the results.
    A folder holding a finished run of the same config is read back, not recomputed; a
    folder holding another is refused."""
    config = {"verb": type(cfg).__name__, **{k: v for k, v in to_json(cfg).items()
                                             if k != "out"}}
    done = read_comparison(cfg.out, config)
    if done is not None:
        return done
    torch.manual_seed(cfg.seed)
    device = join_world(cfg.device).device(cfg.device)  # under torchrun: this rank's GPU
    sae = load_sae(cfg.sae, device=device)
    lm = load_model(cfg.model, device=device)
    site = _site(cfg, sae)
    fit_windows, windows = corpus_windows(lm, cfg.corpus, text_column=cfg.text_column,
                                          context_size=cfg.context_size,
                                          skip_tokens=cfg.skip_tokens,
                                          fit_tokens=cfg.fit_tokens, tokens=cfg.tokens)
    if isinstance(cfg, CompareConfig):
        coders, ks = cfg.coders, cfg.k

        def specs(matched_k: int) -> tuple[list[CoderSpec], int]:
            return plan(coders, ks, matched_k), matched_k
    else:  # one coder: a pursuit at --k (default: matched to the encoder)
        spec, fixed_k = CoderSpec.named(cfg.coder), cfg.k

        def specs(matched_k: int) -> tuple[list[CoderSpec], int]:
            k = (fixed_k or matched_k) if spec.coder in PURSUIT_METHODS else None
            return [CoderSpec(spec.coder, k, spec.nonnegative)], k or matched_k
    return score_dictionary(lm, sae, site, fit_windows, windows, specs, cfg.out,
                            about={"model": cfg.model, "sae": cfg.sae},
                            batch_tokens=cfg.batch_tokens)


def read_comparison(out: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """Tie `out` to `config` (its config.json; a folder holding another comparison is
    refused) and return the results of a comparison finished there, or None."""
    if record_run(out / "config.json", config, what="a comparison") \
            and (out / RESULTS).is_file():
        log.info("%s holds this comparison already; reading it back", out)
        return read_json(out / RESULTS)
    return None


def score_dictionary(lm: LanguageModel, sae: SAE, site: str, fit_windows: np.ndarray,
                     windows: np.ndarray, specs: Callable[[int], tuple[list[CoderSpec], int]],
                     out: Path, *, about: dict[str, Any], batch_tokens: int = 1024,
                     spliced: Callable[[CoderSpec, int], bool] | None = None,
                     attribution: bool = False, principal_directions: int = 0,
                     passes: dict[int, BatchPasses] | None = None) -> dict[str, Any]:
    """Score one dictionary's coders on `windows`, after measuring its encoder's L0 (and
    fitting encoder-scaled) on `fit_windows`; `specs(matched_k)` gives the rows and the L0
    they are matched at from the encoder's L0, rounded; `spliced(spec, matched_k)` which
    rows get the LM metrics (default: all); `attribution` and `principal_directions` (m) add
    each row's first-order predicted delta loss and its error's share in the held-out
    activations' top m principal directions, and `passes` keeps the dictionary-free passes
    for the next dictionary on the same windows (see `run_sweep`). Writes results.json,
    windows.npz, scale.safetensors (if fitted), the plots and report.html into `out`."""
    check_fits(lm, site, sae, str(about.get("model", lm.name)))
    held_out = site_activations(lm, site, fit_windows)
    encoder_l0 = float(Coder(sae, "encoder")(held_out).l0().double().mean())
    rows, matched_k = specs(max(1, round(encoder_l0)))
    scale = fit_scale(sae, held_out) if any(r.coder == "encoder-scaled" for r in rows) \
        else None
    world = join_world(sae.W_dec.device.type)
    if scale is not None and world.is_main:
        scale.save(out / "scale.safetensors")
    principal, variance_share = principal_axes(held_out, principal_directions)
    sweep = run_sweep(lm, sae, site, windows, rows, matched_k=matched_k, scale=scale,
                      batch_tokens=batch_tokens,
                      spliced=None if spliced is None else lambda s: spliced(s, matched_k),
                      attribution=attribution, principal=principal, passes=passes)
    results = {**about, "site": site, "n_latents": sae.n_latents,
               "d_model": sae.d_model, "architecture": sae.architecture,
               "encoder_l0": encoder_l0, "context_size": int(windows.shape[1]),
               "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
               "fit_tokens": int(fit_windows.shape[0] * (fit_windows.shape[1] - 1)),
               "principal": {"directions": principal_directions,
                             "variance_share": variance_share},
               **sweep.results}
    if world.is_main:  # every rank holds the same results; one writes them
        save_columns(sweep.columns, out / WINDOWS)
        write_json(out / RESULTS, results)
        write_plots(results, out)
        write_report(results, out)
    world.barrier()
    return results


def principal_axes(x_ND: torch.Tensor, m: int) -> tuple[torch.Tensor | None, float | None]:
    """The top m principal directions of the rows x [d, m] (orthonormal columns, from the
    centred rows' SVD in float64) and the share of the centred variance they hold."""
    if m <= 0:
        return None, None
    centred = x_ND.double() - x_ND.double().mean(dim=0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    share = float((s[:m] ** 2).sum() / (s ** 2).sum())
    return vh[:m].T.to(x_ND.dtype).contiguous(), share


def _site(cfg: EvalOptions, sae: SAE) -> str:
    site = cfg.site or sae.site
    if site is None:
        raise SaelabError("the SAE does not say which site it reads", expected="--site",
                          found="no site in the SAE's config",
                          fix="pass --site, e.g. --site blocks.6.hook_resid_post")
    return site


def check_fits(lm: LanguageModel, site: str, sae: SAE, model: str) -> None:
    """Refuse an SAE whose width is not the site's."""
    width = lm.site(site).width
    if width != sae.d_model:
        raise SaelabError(f"the SAE does not fit {site} of {model}",
                          expected=f"site width {sae.d_model} (the SAE's d_model)",
                          found=f"width {width}", fix="pick the site the SAE was trained on")


def corpus_windows(lm: LanguageModel, corpus: str, *, text_column: str = "text",
                   context_size: int = 128, skip_tokens: int = 0, fit_tokens: int = 0,
                   tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out windows, evaluated windows) [n, context_size] of `corpus` after skipping
    `skip_tokens`; each count is rounded up to whole windows of context_size - 1 tokens."""
    docs = iter_documents(corpus, text_column=text_column)
    stream = token_windows(docs, lm.tokenizer, context_size, lm.bos_token_id)  # checks the size
    per_window = context_size - 1
    n_skip, n_fit = -(-skip_tokens // per_window), -(-fit_tokens // per_window)
    n_eval = -(-tokens // per_window)
    windows = list(itertools.islice(stream, n_skip, n_skip + n_fit + n_eval))
    if len(windows) < n_fit + 1:
        raise SaelabError(f"corpus {corpus} is too short for this evaluation",
                          expected=f"{n_skip + n_fit + 1} windows of {context_size} tokens",
                          found=f"{n_skip + len(windows)}",
                          fix="lower --skip-tokens, --fit-tokens or --tokens")
    if len(windows) < n_fit + n_eval:
        log.warning("corpus %s holds only %d windows after skipping; evaluating %d tokens",
                    corpus, n_skip + len(windows), (len(windows) - n_fit) * per_window)
    stacked = np.stack(windows)
    return stacked[:n_fit], stacked[n_fit:]


def site_activations(lm: LanguageModel, site: str, windows: np.ndarray) -> torch.Tensor:
    """The site's activations at non-BOS positions [rows, d], float32."""
    parts = [lm.read(torch.from_numpy(windows[i:i + 8]), [site])[site][:, 1:]
             for i in range(0, len(windows), 8)]
    return torch.cat(parts).reshape(-1, parts[0].shape[-1]).float()

