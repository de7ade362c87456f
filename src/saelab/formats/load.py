"""One entry point for every layout: find the SAE a spec names, load it, write it out again.

A folder is recognised by its files; a folder that holds no SAE itself but exactly one
sub-folder that does (a sparsify run with one hookpoint, a dictionary_learning run with one
trainer) stands for that sub-folder; several are listed for the user to pick from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import torch

from saelab.errors import SaelabError
from saelab.formats import dictionary_learning, gemmascope, saelens, sparsify
from saelab.formats.hub import resolve
from saelab.saes import SAE

Format = Literal["saelens", "sparsify", "dictionary_learning", "gemmascope"]
WritableFormat = Literal["saelens", "sparsify", "dictionary_learning"]

# The files that show a folder's layout; the first match wins.
MARKERS: tuple[tuple[Format, tuple[str, ...]], ...] = (
    ("saelens", (saelens.CFG, saelens.WEIGHTS)),
    ("sparsify", (sparsify.CFG, sparsify.WEIGHTS)),
    ("dictionary_learning", (dictionary_learning.AE,)),
    ("gemmascope", (gemmascope.NPZ,)),
    ("gemmascope", (gemmascope.SAFETENSORS,)),
)
READERS: dict[Format, Callable[[Path], SAE]] = {
    "sparsify": sparsify.read, "dictionary_learning": dictionary_learning.read,
    "gemmascope": gemmascope.read}
WRITERS: dict[WritableFormat, Callable[[SAE, Path], Path]] = {
    "sparsify": sparsify.write, "dictionary_learning": dictionary_learning.write}


class Located(NamedTuple):
    """Where an SAE's files are and in which layout."""

    format: Format
    folder: Path
    input_scale: float | None
    """A release's recorded input-norm factor (SAELens), if any."""


def locate(spec: str | Path) -> Located:
    """The layout and folder of the SAE `spec` names (downloading hub specs first)."""
    path, input_scale = resolve(spec)
    folder = path.parent if path.is_file() else path
    fmt = layout(folder)
    if fmt is not None:
        return Located(fmt, folder, input_scale)
    inside: list[tuple[Format, Path]] = [(f, sub) for sub in sorted(folder.iterdir())
                                         if sub.is_dir() and (f := layout(sub)) is not None]
    if len(inside) == 1:
        return Located(inside[0][0], inside[0][1], input_scale)
    names = [sub.name for _, sub in inside]
    raise SaelabError(
        f"{folder} holds {'several SAEs' if names else 'no SAE'}",
        expected="one SAE: " + "; ".join(" + ".join(files) for _, files in MARKERS),
        found=", ".join(names[:8]) + (", ..." if names[8:] else "") if names
        else ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "an empty folder",
        fix=f"pass one of them, e.g. {folder / names[0]}" if names
        else "point at the folder that holds the SAE's files")


def layout(folder: Path) -> Format | None:
    """The layout of the SAE files directly in `folder`, or None."""
    return next((fmt for fmt, files in MARKERS if all((folder / f).is_file() for f in files)),
                None)


def load_sae(spec: str | Path, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, input_scale: float | None = None) -> SAE:
    """An SAE from any layout saelab reads: a folder or file (SAELens, Gemma Scope, sparsify,
    dictionary_learning), `hf://OWNER/REPO[/PATH]`, or `RELEASE:SAE_ID` (SAELens's releases).

    The SAE takes raw activations: input normalisation is folded into its weights. Only an
    SAELens SAE trained on inputs scaled by a factor its files do not record needs
    `input_scale` (sqrt(d_model / mean squared norm) of the activations). Weights are cast to
    `dtype` (float32 by default: pursuits need it)."""
    found = locate(spec)
    if found.format == "saelens":  # the one layout that may need the input scale
        sae = saelens.read(found.folder, input_scale=found.input_scale or input_scale)
    else:
        sae = READERS[found.format](found.folder)
    return sae.to(device=device, dtype=dtype)


def write_sae(sae: SAE, out: str | Path, fmt: WritableFormat = "saelens", *,
              metadata: dict[str, Any] | None = None) -> Path:
    """Write `sae` in layout `fmt` under `out`; returns the SAE's folder (for sparsify
    `out/HOOKPOINT`, as its runs are laid out). `metadata` (JSON values) is recorded in the
    saelens layout's cfg.json; the other layouts have no place for it."""
    if fmt != "saelens" and fmt not in WRITERS:
        raise SaelabError(f"saelab cannot write the {fmt!r} layout",
                          expected=" or ".join(get_args(WritableFormat)), found=repr(fmt),
                          fix="pick one of them")
    there = layout(Path(out))
    if there not in (None, fmt):
        raise SaelabError(f"{out} already holds an SAE in the {there} layout",
                          expected=f"an empty folder or one holding a {fmt} SAE",
                          found=f"{there} files", fix="pick another --out")
    if fmt == "saelens":
        return saelens.write(sae, Path(out), metadata)
    return WRITERS[fmt](sae, Path(out))
