"""Specs -> local folders: a path as it is; `hf://OWNER/REPO[/PATH]` and `RELEASE:SAE_ID`
(a SAELens release) downloaded into the Hugging Face cache first.

Only the files saelab reads are fetched, so one SAE of a repository of hundreds costs one
SAE's download. The cache is huggingface_hub's (`HF_HOME`, `HF_HUB_CACHE`): a second load, or
one with `HF_HUB_OFFLINE=1`, reads it without the network; a miss says what was tried.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from saelab.errors import SaelabError
from saelab.formats.releases import lookup

# Every file name a reader in saelab.formats opens.
SAE_FILES = ("cfg.json", "sae_weights.safetensors", "activation_scaler.json", "sae.safetensors",
             "params.npz", "params.safetensors", "config.json", "ae.pt")
_HF = re.compile(r"^hf:(?://)?([^/]+/[^/]+)/?(.*)$")


class Resolved(NamedTuple):
    """A spec made local."""

    path: Path
    """The local file or folder."""
    input_scale: float | None
    """A release's recorded input-norm factor (SAELens), if any."""


def resolve(spec: str | Path) -> Resolved:
    """A local path for `spec`, downloading into the Hugging Face cache when it names the hub."""
    text = str(spec)
    hub = _HF.match(text)
    if hub:
        return Resolved(download(hub[1], hub[2].strip("/")), None)
    local = Path(text).expanduser()
    if local.exists():
        return Resolved(local, None)
    release, colon, sae_id = text.partition(":")
    if colon and release and sae_id and "/" not in release:
        found = lookup(release, sae_id)
        return Resolved(download(found.repo_id, found.path), found.input_scale)
    raise SaelabError(f"no SAE at {text}", found="no such file or folder",
                      expected="a folder or file in a layout saelab reads, "
                      "hf://OWNER/REPO[/PATH], or RELEASE:SAE_ID (a SAELens release)",
                      fix="check the path; `saelab info SPEC` says what saelab finds there")


def download(repo_id: str, path: str) -> Path:
    """The folder `path` of hub repository `repo_id`, its SAE files fetched into the cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    patterns = [f"{path}/{name}" if path else name for name in SAE_FILES]
    tried = f"{repo_id}, files {', '.join(patterns[:3])}, ... (cache {constants.HF_HUB_CACHE})"
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (OSError, ValueError, EntryNotFoundError) as err:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise SaelabError(f"cannot fetch {repo_id}/{path} from the Hugging Face hub{offline}",
                          expected=f"the SAE in the hub or the cache: {tried}",
                          found=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                          fix="connect to the network (log in for gated repositories), or "
                          "download the folder another way and pass its path") from err
    folder = root / path
    if not folder.is_dir() or not any(p.name in SAE_FILES for p in folder.iterdir()):
        raise SaelabError(f"no SAE files at {repo_id}/{path}", expected=tried,
                          found=f"{folder} is missing or holds none of them",
                          fix="check the path inside the repository (case matters)")
    return folder
