"""SAELens release names -> (Hugging Face repository, folder in it).

SAELens keeps the directory of its pretrained releases in `pretrained_saes.yaml`, shipped in
the sae-lens package; when that package is installed saelab reads the file (without importing
sae_lens, which pulls in TransformerLens). Gemma Scope's release names follow a rule, so they
resolve without it.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from saelab.errors import SaelabError


class Release(NamedTuple):
    """Where one SAE of a release lives."""

    repo_id: str
    """Hugging Face repository, `owner/name`."""
    path: str
    """Folder of the SAE inside the repository."""
    input_scale: float | None
    """The input-norm factor SAELens records for SAEs trained on normalised inputs."""


_GEMMA_SCOPE = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)")
_GEMMA_SCOPE_2 = re.compile(r"gemma-scope-2-(\w+?)-(pt|it)-(res|mlp|att)(-all)?")
_V2_FOLDERS = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_out"}


def lookup(release: str, sae_id: str) -> Release:
    """The repository and folder of SAE `sae_id` of SAELens release `release`."""
    directory = saelens_directory()
    if directory is not None and release in directory:
        entry = directory[release]
        for sae in entry["saes"]:
            if sae["id"] == sae_id:
                return Release(entry["repo_id"], str(sae["path"]),
                               sae.get("norm_scaling_factor"))
        ids = [sae["id"] for sae in entry["saes"]]
        raise SaelabError(f"release {release!r} has no SAE {sae_id!r}",
                          expected="one of " + ", ".join(ids[:5]) + (", ..." if ids[5:] else ""),
                          found=sae_id, fix="pick an id from the release")
    found = gemma_scope(release, sae_id)
    if found is None:
        raise SaelabError(f"unknown SAE release {release!r}",
                          expected="a SAELens release name (its directory is read from the "
                          "sae-lens package) or a Gemma Scope release name",
                          found=release + (" (sae-lens is not installed)" if directory is None
                                           else " (not in SAELens's directory)"),
                          fix="name the repository instead: hf://OWNER/REPO/PATH" +
                          (", or install sae-lens for its directory of releases"
                           if directory is None else ""))
    return found


def gemma_scope(release: str, sae_id: str) -> Release | None:
    """Gemma Scope names by rule: `gemma-scope-2b-pt-res` is the repository
    google/gemma-scope-2b-pt-res and the id its folder; `gemma-scope-2-1b-pt-res[-all]` is
    folder resid_post[_all]/ID of google/gemma-scope-2-1b-pt."""
    if _GEMMA_SCOPE.fullmatch(release):
        return Release(f"google/{release}", sae_id, None)
    match = _GEMMA_SCOPE_2.fullmatch(release)
    if match:
        folder = _V2_FOLDERS[match[3]] + ("_all" if match[4] else "")
        return Release(f"google/gemma-scope-2-{match[1]}-{match[2]}", f"{folder}/{sae_id}", None)
    return None


@cache
def saelens_directory() -> dict[str, Any] | None:
    """SAELens's `pretrained_saes.yaml`, or None when sae-lens is not installed."""
    spec = importlib.util.find_spec("sae_lens")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / "pretrained_saes.yaml" if locations else None
    if path is None or not path.is_file():
        return None
    import yaml

    with open(path) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
