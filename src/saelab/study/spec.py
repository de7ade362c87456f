"""What a study is: the dictionaries (trained here, or loaded), the coders, the k grid and the
token counts. A preset names one; a JSON or TOML file gives another, field for field.

A dictionary is one entry: trained from `architecture` (and any `TrainConfig` field in
`options`, so a new architecture with settings of its own is still one entry), or loaded
from `sae` (any layout `load_sae` reads: a folder, `hf://...`, `RELEASE:SAE_ID`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saelab.corpus import BUILTIN_CORPUS
from saelab.errors import SaelabError
from saelab.evals import CODER_NAMES
from saelab.lm import EMBEDDED_MODEL


@dataclass(frozen=True, kw_only=True)
class DictionaryEntry:
    """One dictionary of the grid."""

    name: str
    """A short name, unique in the study (its folders are dictionaries/NAME, evals/NAME)."""
    architecture: str | None = None
    """Train one of this architecture on the study's store (relu, topk, batchtopk, ...)."""
    target_l0: float | None = None
    """Its target L0 (k for topk and batchtopk; the steered coefficient's goal otherwise)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Other TrainConfig fields for this dictionary (k, sparsity_coef, seed, ...)."""
    sae: str | None = None
    """Or load this SAE instead of training one."""

    def __post_init__(self) -> None:
        if (self.architecture is None) == (self.sae is None):
            raise SaelabError(f"study dictionary {self.name!r} needs exactly one source",
                              expected="architecture (to train one) or sae (to load one)",
                              found=f"architecture={self.architecture!r}, sae={self.sae!r}",
                              fix="give one of the two")

    @property
    def trained(self) -> bool:
        return self.architecture is not None


def grid(architectures: tuple[str, ...], l0s: tuple[int, ...]) -> tuple[DictionaryEntry, ...]:
    """One trained dictionary per architecture and target L0, named ARCH-L0."""
    return tuple(DictionaryEntry(name=f"{a}-{l0}", architecture=a, target_l0=float(l0))
                 for a in architectures for l0 in l0s)


ALL_CODERS = ("encoder", "encoder-refit", "nn-encoder-refit", "encoder-scaled", "mp", "gp",
              "omp", "nn-mp", "nn-gp", "nn-omp")


@dataclass(frozen=True, kw_only=True)
class StudySpec:
    """Every setting of a study (the defaults are the embedded preset's)."""

    model: str = EMBEDDED_MODEL
    site: str = "blocks.6.hook_resid_post"
    corpus: str = BUILTIN_CORPUS
    text_column: str = "text"
    context_size: int = 128
    cache_tokens: int = 200_000
    """Activations cached for training (the evaluation reads the text after them)."""
    n_latents: int = 4096
    train_tokens: int = 2_000_000
    """Training tokens per trained dictionary (the store is reread in epochs)."""
    batch_size: int = 4096
    curve_tokens: tuple[int, ...] = (125_000, 250_000, 500_000, 1_000_000)
    """Training tokens at which each trained dictionary is also saved and its encoder scored
    on the first `curve_eval_tokens` evaluated tokens (delta loss, FVU, L0 with intervals): the
    curve that says whether more training would still help; its last point is the finished
    dictionary. (The learning rate decays over the last fifth of a run, so the last point
    has had its decay and the earlier ones have not.)"""
    curve_eval_tokens: int = 4096
    dictionaries: tuple[DictionaryEntry, ...] = grid(("relu", "jumprelu", "topk", "batchtopk"),
                                                     (16, 32, 64))
    coders: tuple[str, ...] = ALL_CODERS
    ks: tuple[int, ...] = (8, 16, 32, 64, 128)
    """Pursuits' L0s (each also runs at the dictionary's encoder L0)."""
    spliced_at_every_k: tuple[str, ...] = ("nn-gp",)
    """Coders whose delta loss, KL and loss recovered are measured at every k; the others get
    them at the matched L0 only (FVU and L0 everywhere). A spliced row costs a forward pass
    of the model and its full vocabulary head; on Gemma 3 270M on 2 CPU cores that is most
    of a study's time. ("all": every row.)"""
    max_matched_k: int = 256
    """Pursuits run at a dictionary's encoder L0 only up to this k: a pursuit's cost grows
    with k (OMP's with k^2), and a dictionary whose encoder fires hundreds of latents is
    then compared at the ks alone."""
    eval_tokens: int = 20_480
    fit_tokens: int = 4096
    """Held out before the evaluated tokens: encoder-scaled's fit and the encoder's L0."""
    batch_tokens: int = 1024
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        names = [d.name for d in self.dictionaries]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice or not names:
            raise SaelabError("a study needs dictionaries with distinct names",
                              expected="one or more, each name once",
                              found=", ".join(twice) if twice else "none",
                              fix="rename the repeated entries")
        unknown = [c for c in (*self.coders, *self.spliced_at_every_k)
                   if c not in (*CODER_NAMES, "all")]
        if unknown:
            raise SaelabError(f"unknown coder {unknown[0]!r} in the study",
                              expected=", ".join(CODER_NAMES), found=", ".join(self.coders),
                              fix="pick coders from that list")

    @property
    def trains(self) -> bool:
        return any(d.trained for d in self.dictionaries)


PRESETS: dict[str, StudySpec] = {
    "embedded": StudySpec(),
    # minutes, for CI: the same stages at toy sizes
    "quick": StudySpec(context_size=64, cache_tokens=8_000, n_latents=512, train_tokens=48_000,
                       batch_size=1000, curve_tokens=(12_000, 24_000), curve_eval_tokens=630,
                       dictionaries=grid(("topk",), (8, 16)),
                       coders=("encoder", "encoder-scaled", "gp", "nn-gp"), ks=(8, 16),
                       eval_tokens=630, fit_tokens=252, batch_tokens=630),
}


def read_spec(path: Path) -> StudySpec:
    """A StudySpec from a .json or .toml file: the fields of StudySpec, `dictionaries` a list
    of tables with DictionaryEntry's fields; fields not given keep the embedded preset's."""
    if not path.is_file():
        raise SaelabError(f"study file {path} does not exist", expected="a .json or .toml file",
                          found="nothing there", fix="check the path")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            raw = importlib.import_module("tomllib").loads(text)  # Python >= 3.11
        else:
            raw = json.loads(text)
    except (ValueError, ImportError) as err:
        raise SaelabError(f"cannot read study file {path}", expected="valid JSON or TOML "
                          "(TOML needs Python 3.11 or newer)", found=str(err),
                          fix="fix the file, or write it as JSON") from err
    known = {f.name for f in dataclasses.fields(StudySpec)}
    extra = sorted(set(raw) - known)
    if extra:
        raise SaelabError(f"study file {path} has unknown settings",
                          expected=", ".join(sorted(known)), found=", ".join(extra),
                          fix="remove or rename them")
    entry_fields = {f.name for f in dataclasses.fields(DictionaryEntry)}
    entries = []
    for i, entry in enumerate(raw.get("dictionaries", [])):
        bad = sorted(set(entry) - entry_fields) if isinstance(entry, dict) else ["not a table"]
        if bad or "name" not in entry:
            raise SaelabError(f"dictionary {i + 1} of {path} is malformed",
                              expected="a table with name and architecture or sae (and "
                              "target_l0, options)", found=", ".join(bad) or "no name",
                              fix="fix that entry")
        entries.append(DictionaryEntry(**entry))
    settings: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                for k, v in raw.items() if k != "dictionaries"}
    if entries:
        settings["dictionaries"] = tuple(entries)
    return StudySpec(**settings)
