"""`saelab judge new`: freeze a judgement study of two coders on one dictionary.

The store's first `tokens` rows are coded under both coders; `latents` latents that fire on
at least `MIN_FIRES` rows under both are drawn. Three tasks, each trial's content computed
here once and stored:

- rate (the Gated SAE paper's protocol, section 4.3): one latent's card under one coder (its
  top contexts and one example from each activation decile, each token shaded by the
  activation, and its firing rate); the same latent under the other coder is its pair.
- pair: one token in its context and the two coders' decompositions of its activation, side
  by side, left and right drawn at random per trial: the largest latents of each code with
  their weights and each latent's compact card under that coder.
- intruder: four contexts where a latent fires under one coder and one where it does not,
  shuffled, the marked token of each shown without shading.

Blinding: a payload names no coder and no latent index, activations and weights are shown
relative to the card's (or the code's) largest, and the trials are shuffled before they get
their ids. What a trial hides goes to the key table (`db`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from saelab.activations import ActivationStore
from saelab.coding import PURSUIT_METHODS, Coder, SparseCode
from saelab.errors import SaelabError
from saelab.evals import (
    CoderName,
    CoderSpec,
    activations_of,
    check_sae_fits_store,
    code_rows,
    context_of,
)
from saelab.formats import load_sae
from saelab.io import record_run, to_json
from saelab.judge.db import DATABASE, Trial, create_study_db
from saelab.lm import LanguageModel, load_model

log = logging.getLogger(__name__)
Task = Literal["rate", "pair", "intruder"]
TASKS: tuple[Task, ...] = ("rate", "pair", "intruder")
MIN_FIRES = 8  # a drawn latent fires on at least this many coded rows under each coder
DECILES = 10
CHUNK = 256  # latents whose dense activations are built at once


@dataclass(frozen=True, kw_only=True)
class JudgeNewConfig:
    sae: str
    """The SAE: a folder or file in any layout saelab reads, hf://..., or RELEASE:SAE_ID."""
    activations: Path
    """Activation store from `saelab cache` (its token ids give the contexts)."""
    out: Path
    """Study folder: study.db (trials, key, answers) and config.json."""
    coders: tuple[CoderName, ...] = ("encoder", "nn-gp")
    """The two coders compared (`nn-` first: non-negative)."""
    k: int | None = None
    """Latents per token for a pursuit (default: the encoder's L0 on the coded rows,
    rounded)."""
    latents: int = 150
    """Latents drawn for the rate and intruder tasks (the same latents under both coders)."""
    pairs: int | None = None
    """Tokens shown in the pair task (default: as many as --latents)."""
    tokens: int = 50_000
    """Code the store's first N rows; every example comes from these."""
    tasks: tuple[Task, ...] = TASKS
    """Which tasks the study holds: rate, pair, intruder."""
    contexts: int = 5
    """Top contexts on a card (a compact card in the pair task shows 3)."""
    pair_latents: int = 8
    """Largest latents of each decomposition shown in the pair task."""
    window: int = 12
    """Tokens shown before a context's marked token (and 3 after it)."""
    seed: int = 0
    """Seed of the draws (latents, examples, sides, shuffles) and of each rater's order."""
    batch_size: int = 4096
    """Rows coded at once."""
    device: str = "cpu"
    """Device to code on."""
    allow_mismatch: bool = False
    """Code the store even if the SAE was trained at another site or on another model."""

    def __post_init__(self) -> None:
        if len(self.coders) != 2 or self.coders[0] == self.coders[1]:
            raise SaelabError("a judgement study compares two coders",
                              expected="--coders A,B (two different coders, e.g. "
                              "encoder,nn-gp)", found=",".join(self.coders),
                              fix="name exactly two")
        bad = [t for t in self.tasks if t not in TASKS] or ([] if self.tasks else ["none"])
        if bad:
            raise SaelabError("unknown judgement task", expected=", ".join(TASKS),
                              found=", ".join(bad), fix="pick tasks from that list")


def new_study(cfg: JudgeNewConfig) -> dict[str, Any]:
    """Code, draw and freeze every trial into `cfg.out/study.db`; return its summary. A
    folder holding a finished study of the same settings is read back, not rebuilt."""
    record_run(cfg.out / "config.json", {k: v for k, v in to_json(cfg).items() if k != "out"},
               what="a judgement study")
    db = cfg.out / DATABASE
    if db.is_file():
        log.info("%s holds this study already", cfg.out)
        return {"out": str(db), "reused": True}
    store = ActivationStore(cfg.activations)
    sae = load_sae(cfg.sae, device=cfg.device, input_scale=store.normalisation["norm_scale"])
    check_sae_fits_store(sae, store, allow_mismatch=cfg.allow_mismatch)
    n = min(cfg.tokens, len(store))
    specs = [CoderSpec.named(c) for c in cfg.coders]
    k = cfg.k
    if k is None and any(s.coder in PURSUIT_METHODS for s in specs):
        encoder = code_rows(store, Coder(sae, "encoder"), n, cfg.batch_size, cfg.device,
                            "encoder")
        k = max(1, round(float(encoder.l0().double().mean())))
    codes = [code_rows(store, Coder(sae, s.coder, k=k if s.coder in PURSUIT_METHODS else None,
                                    nonnegative=s.nonnegative), n, cfg.batch_size, cfg.device,
                       s.name) for s in specs]
    rng = random.Random(cfg.seed)
    fires = torch.stack([c.firing_counts(sae.n_latents) for c in codes])
    eligible = (fires >= MIN_FIRES).all(dim=0).nonzero().squeeze(1).tolist()
    if not eligible:
        raise SaelabError("no latent fires often enough under both coders",
                          expected=f"latents firing on >= {MIN_FIRES} of the coded rows "
                          "under each coder", found=f"none in {n} rows",
                          fix="code more rows (--tokens) or check the SAE matches the store")
    if len(eligible) < cfg.latents:
        log.warning("only %d latents fire on >= %d rows under both coders; drawing them all",
                    len(eligible), MIN_FIRES)
    chosen = sorted(rng.sample(eligible, min(cfg.latents, len(eligible))))
    lm = load_model(store.model)
    maker = _Maker(cfg, store, lm, rng, sae.n_latents)
    trials: list[Trial] = []
    for name, code in zip(cfg.coders, codes, strict=True):
        acts = activations_of(code, torch.tensor(chosen), sae.n_latents)
        for j, latent in enumerate(chosen):
            key = {"coder": name, "latent": latent}
            if "rate" in cfg.tasks:
                card, rows = maker.card(acts[:, j], cfg.contexts)
                trials.append(Trial("rate", {"card": card}, {**key, **rows}))
            if "intruder" in cfg.tasks:
                payload, rows, where = maker.intruder(acts[:, j])
                trials.append(Trial("intruder", payload,
                                    {**key, "rows": rows, "intruder": where}))
    if "pair" in cfg.tasks:
        trials += maker.pairs(codes, cfg.pairs if cfg.pairs is not None else cfg.latents)
    rng.shuffle(trials)
    meta = {"seed": cfg.seed, "coders": list(cfg.coders), "k": k, "latents": chosen,
            "tokens": n, "sae": cfg.sae, "activations": str(store.path), "model": store.model,
            "site": store.site, "tasks": list(cfg.tasks)}
    create_study_db(db, meta, trials)
    counts = {t: sum(tr.task == t for tr in trials) for t in cfg.tasks}
    return {"out": str(db), "reused": False, "trials": counts, "k": k, "tokens": n}


class _Maker:
    """What the trials show, built from the store's contexts."""

    def __init__(self, cfg: JudgeNewConfig, store: ActivationStore, lm: LanguageModel,
                 rng: random.Random, n_latents: int) -> None:
        self.cfg, self.store, self.lm, self.rng, self.n_latents = cfg, store, lm, rng, n_latents

    def context(self, row: int, acts_B: Tensor | None, scale: float = 1.0) -> dict[str, Any]:
        """A context's tokens (text, shade in [-1, 1] or None, marked); nothing else."""
        ctx = context_of(row, acts_B, self.store, self.lm, self.cfg.window)
        return {"tokens": [{"text": t["text"], "top": t["top"],
                            "shade": None if t["activation"] is None
                            else round(t["activation"] / scale, 3)} for t in ctx["tokens"]]}

    def card(self, acts_B: Tensor, contexts: int, deciles: bool = True
             ) -> tuple[dict[str, Any], dict[str, list[int]]]:
        """A latent's card under one coder (firing rate, top contexts, an example from each
        activation decile), and the rows it shows (for the key)."""
        fired = (acts_B != 0).nonzero().squeeze(1)
        scale = float(acts_B.abs().max()) or 1.0
        rows = {"top": acts_B.abs().topk(min(contexts, len(fired))).indices.tolist()}
        if deciles:
            ranked = fired[acts_B[fired].abs().argsort()].tolist()
            bins = [ranked[i * len(ranked) // DECILES:(i + 1) * len(ranked) // DECILES]
                    for i in range(DECILES)]
            rows["deciles"] = [self.rng.choice(b) for b in bins if b]
        card: dict[str, Any] = {"frequency": round(len(fired) / len(acts_B), 6)}
        card |= {part: [self.context(r, acts_B, scale) for r in shown]
                 for part, shown in rows.items()}
        return card, rows

    def intruder(self, acts_B: Tensor) -> tuple[dict[str, Any], list[int], int]:
        """Four firing contexts and one silent one, shuffled; the rows in the order shown;
        where the silent one is."""
        fired = (acts_B != 0).nonzero().squeeze(1).tolist()
        silent = (acts_B == 0).nonzero().squeeze(1).tolist()
        rows = self.rng.sample(fired, 4)
        where = self.rng.randrange(5)
        rows.insert(where, self.rng.choice(silent))
        return {"contexts": [self.context(r, None) for r in rows]}, rows, where

    def pairs(self, codes: list[SparseCode], count: int) -> list[Trial]:
        """`count` rows where both codes are non-empty, each coder's decomposition on a side
        drawn at random."""
        live = ((codes[0].values != 0).any(dim=1) & (codes[1].values != 0).any(dim=1))
        rows = sorted(self.rng.sample(live.nonzero().squeeze(1).tolist(),
                                      min(count, int(live.sum()))))
        shown = [self._largest(c, rows) for c in codes]
        top = self.cfg.pair_latents
        cards = [self._compact_cards(c, {latent for row in s for latent, _ in row[:top]})
                 for c, s in zip(codes, shown, strict=True)]
        trials = []
        for i, row in enumerate(rows):
            sides = [self._decomposition(shown[c][i], cards[c]) for c in (0, 1)]
            left = self.rng.randrange(2)
            names = self.cfg.coders
            trials.append(Trial("pair", {"context": self.context(row, None),
                                         "left": sides[left], "right": sides[1 - left]},
                                {"row": row, "left": names[left], "right": names[1 - left],
                                 "latents": {names[c]: [lat for lat, _ in
                                                        shown[c][i][:top]] for c in (0, 1)}}))
        return trials

    def _largest(self, code: SparseCode, rows: list[int]) -> list[list[tuple[int, float]]]:
        """Each row's (latent, value) by decreasing size, a latent's slots summed."""
        out = []
        for row in rows:
            weights: dict[int, float] = {}
            for latent, value in zip(code.indices[row].tolist(), code.values[row].tolist(),
                                     strict=True):
                if value != 0:
                    weights[latent] = weights.get(latent, 0.0) + value
            out.append(sorted(weights.items(), key=lambda lv: -abs(lv[1])))
        return out

    def _compact_cards(self, code: SparseCode, latents: set[int]) -> dict[int, dict[str, Any]]:
        """Top-3 cards, no deciles, for `latents` under one coder (CHUNK at a time)."""
        wanted = sorted(latents)
        cards = {}
        for start in range(0, len(wanted), CHUNK):
            part = wanted[start:start + CHUNK]
            acts = activations_of(code, torch.tensor(part), self.n_latents)
            for j, latent in enumerate(part):
                cards[latent] = self.card(acts[:, j], 3, deciles=False)[0]
        return cards

    def _decomposition(self, weights: list[tuple[int, float]], cards: dict[int, dict[str, Any]]
                       ) -> dict[str, Any]:
        """The largest latents of one code, weights relative to its largest, with cards."""
        shown = weights[: self.cfg.pair_latents]
        largest = abs(shown[0][1])
        return {"latents": [{"weight": round(w / largest, 3), "card": cards[latent]}
                            for latent, w in shown],
                "more": len(weights) - len(shown)}
