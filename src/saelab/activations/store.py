"""`ActivationStore`: a memory-mapped, read-only view of activations cached on disk.

A store is one folder per site:

    manifest.json        what, where from, how many, checksums, normalisation statistics
    tokens.npy           [n_windows, context_size] int32 token ids of every window
    acts_00000.npy ...   [rows, d_model] activations, rows in window order

Row r of the store is token `position_of(r)` of window `r // rows_per_window` (BOS positions
are left out by default, so a window contributes context_size - 1 rows). Shards are opened
with `np.load(mmap_mode="r")`: the store is never read into RAM as a whole.

Opening a store checks it: the manifest, every shard's shape, and every shard's sha256
against the manifest. Hashing reads each shard once (1.2-1.6 s per GiB on 2 cores:
benchmarks/extract.py); the result is kept in `.verified.json` beside the shards, keyed by
each file's size and modification time, so later opens hash only shards that changed on disk
since (the writer records the shards it wrote, so a fresh store is not hashed again). A change that keeps a file's size and mtime
(a bit flipped by failing hardware) is caught only by `verify(force=True)`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.activations.order import batch_indices
from saelab.distributed import World
from saelab.errors import SaelabError
from saelab.io import read_json, sha256_files, write_json

log = logging.getLogger(__name__)

FORMAT = "saelab-activations/1"
MANIFEST = "manifest.json"
TOKENS = "tokens.npy"
VERIFIED = ".verified.json"  # shard file -> [size, mtime_ns, sha256] of its last check
_REQUIRED = ("model", "model_fingerprint", "site", "d_model", "dtype", "context_size",
             "exclude_bos", "n_tokens", "n_windows", "shards", "normalisation")


@dataclass(frozen=True)
class TokenContext:
    """Where a row came from: its window's token ids and its position in that window."""

    window: int
    position: int
    token_ids: list[int]


def shard_name(index: int) -> str:
    return f"acts_{index:05d}.npy"


def file_stamp(path: Path) -> list[int]:
    """[size, mtime_ns]: what `.verified.json` keys a check on."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def record_verified(folder: Path, checked: dict[str, str]) -> None:
    """Add shard files whose bytes hash to the manifest's sha256 to `.verified.json`
    (silently skipped when the folder is read-only: the next open checks again)."""
    record = _verified(folder)
    record.update({name: [*file_stamp(folder / name), sha] for name, sha in checked.items()})
    try:
        write_json(folder / VERIFIED, record)
    except OSError as err:
        log.debug("cannot record verified shards in %s: %s", folder, err)


def _verified(folder: Path) -> dict[str, Any]:
    try:
        record = json.loads((folder / VERIFIED).read_text())
    except (OSError, ValueError):  # absent or damaged: nothing is known verified
        return {}
    return record if isinstance(record, dict) else {}


def resolve_store_dir(path: Path, site: str | None) -> Path:
    """The store folder for `site` under `path` (a store itself, or a `saelab cache` output)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if site is not None and (path / site / MANIFEST).is_file():
        return path / site
    found = sorted(p.parent.name for p in path.glob(f"*/{MANIFEST}")) if path.is_dir() else []
    if site is None and len(found) == 1:
        return path / found[0]
    raise SaelabError(
        f"no activation store for {'site ' + site if site else 'a site'} in {path}",
        expected=f"a folder with {MANIFEST}, or a `saelab cache` output holding one site folder",
        found=("site folders " + ", ".join(found)) if found else "no manifest.json "
        "(an unfinished `saelab cache` run leaves none: run the same command again to finish it)",
        fix="pass the site folder, or the site (--site) to pick one" if found else
        "run `saelab cache ... --out DIR` first",
    )


class ActivationStore:
    """Read activations cached by `saelab cache`: by index, or as seeded shuffled batches."""

    def __init__(self, path: str | Path, site: str | None = None, *, verify: bool = True
                 ) -> None:
        self.path = resolve_store_dir(Path(path).expanduser(), site)
        self.manifest: dict[str, Any] = read_json(self.path / MANIFEST)
        if self.manifest.get("format") != FORMAT:
            raise SaelabError(f"{self.path / MANIFEST} is not a saelab activation store manifest",
                              expected=FORMAT, found=str(self.manifest.get("format")),
                              fix="re-create the store with `saelab cache`")
        absent = [key for key in _REQUIRED if key not in self.manifest]
        if absent:
            raise SaelabError(f"{self.path / MANIFEST} is incomplete",
                              expected="the fields " + ", ".join(_REQUIRED),
                              found="no " + ", ".join(absent),
                              fix="re-create the store with `saelab cache`")
        self._shards = [self._open_shard(s) for s in self.manifest["shards"]]
        rows = np.array([len(s) for s in self._shards], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(rows)])  # [n_shards + 1]
        if self._offsets[-1] != self.n_tokens:
            raise SaelabError(f"store {self.path} is inconsistent",
                              expected=f"{self.n_tokens} rows (manifest)",
                              found=f"{self._offsets[-1]} rows in its shards",
                              fix="re-create the store with `saelab cache`")
        self._tokens: np.ndarray | None = None
        if verify:
            self.verify()

    def _open_shard(self, entry: dict[str, Any]) -> np.ndarray:
        file = self.path / entry["file"]
        try:
            shard = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as err:  # missing, or shorter than its header says
            raise SaelabError(
                f"shard {file} is missing or truncated",
                expected=f"{entry['rows']} rows x {self.d_model} {self.manifest['dtype']}",
                found=str(err).splitlines()[0],
                fix="delete the store folder and run `saelab cache` again",
            ) from err
        if shard.shape != (entry["rows"], self.d_model):
            raise SaelabError(f"shard {file} has the wrong shape",
                              expected=f"({entry['rows']}, {self.d_model})", found=str(shard.shape),
                              fix="delete the store folder and run `saelab cache` again")
        return shard

    # -- what the store holds ---------------------------------------------------------------
    @property
    def site(self) -> str:
        return self.manifest["site"]

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def context_size(self) -> int:
        return int(self.manifest["context_size"])

    @property
    def normalisation(self) -> dict[str, Any]:
        """`mean`, `mean_squared_norm`, `mean_centered_squared_norm`, `norm_scale`."""
        return self.manifest["normalisation"]

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, model={self.model!r}, site={self.site!r}, "
                f"n_tokens={self.n_tokens}, d_model={self.d_model})")

    def require(self, *, model: str | None = None, site: str | None = None,
                fingerprint: str | None = None, d_model: int | None = None) -> None:
        """Raise unless the store was made from this model (name, sha256) at this site, and
        is this wide."""
        checks = [("model", model, self.model), ("site", site, self.site),
                  ("model fingerprint", fingerprint, self.manifest["model_fingerprint"]),
                  ("width", d_model, self.d_model)]
        for what, asked, found in checks:
            if asked is not None and asked != found:
                raise SaelabError(f"store {self.path} holds activations of another {what}",
                                  expected=str(asked), found=str(found),
                                  fix="pass a store cached from that model and site, or cache one "
                                  "with `saelab cache`")

    def verify(self, *, force: bool = False) -> None:
        """Check every shard's sha256 against the manifest; shards recorded as verified and
        unchanged on disk since are skipped, unless `force` (see the module docstring)."""
        record = {} if force else _verified(self.path)
        checked: dict[str, str] = {}
        for entry in self.manifest["shards"]:
            file = self.path / entry["file"]
            if record.get(entry["file"]) == [*file_stamp(file), entry["sha256"]]:
                continue
            digest = sha256_files([file])
            if digest != entry["sha256"]:
                raise SaelabError(f"shard {file} is corrupt (checksum)",
                                  expected=f"sha256 {entry['sha256']}", found=f"sha256 {digest}",
                                  fix="delete the store folder and run `saelab cache` again")
            checked[entry["file"]] = digest
        if checked:
            record_verified(self.path, checked)

    # -- rows -------------------------------------------------------------------------------
    def __getitem__(self, index: int | slice | np.ndarray | Tensor) -> Tensor:
        """Rows as float32 [len(index), d_model] (or [d_model] for an int)."""
        if isinstance(index, int | np.integer):
            return self.rows(np.array([int(index)]))[0]
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        return self.rows(np.asarray(index, dtype=np.int64))

    def rows(self, index: np.ndarray) -> Tensor:
        """Rows at `index` [n] in that order, gathered shard by shard (each shard read in
        ascending row order)."""
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for a store of {len(self)} rows")
        shard_of = np.searchsorted(self._offsets, index, side="right") - 1  # [n]
        out = np.empty((index.size, self.d_model), dtype=np.float32)  # [n, d_model]
        for s in np.unique(shard_of):
            mask = shard_of == s
            local = index[mask] - self._offsets[s]
            order = np.argsort(local, kind="stable")  # read each shard front to back
            out[np.flatnonzero(mask)[order]] = self._shards[s][local[order]]
        return torch.from_numpy(out)

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1, drop_last: bool = False) -> Iterator[Tensor]:
        """Float32 batches of one pass over the store, in saelab's one order
        (`activations.order`, the order training reads): each global batch holds batch_size
        rows and process `rank` of `world_size` gets its slice of it. The same seed and
        epoch always give the same batches."""
        part = World(rank, world_size).slice
        for index in batch_indices(len(self), batch_size, shuffle=shuffle, seed=seed,
                                   epoch=epoch, drop_last=drop_last):
            yield self.rows(index[part(len(index))])

    # -- provenance ---------------------------------------------------------------------------
    @property
    def rows_per_window(self) -> int:
        return self.context_size - (1 if self.manifest["exclude_bos"] else 0)

    def token_ids(self) -> np.ndarray:
        """Token ids [n_windows, context_size] of every window (memory-mapped)."""
        if self._tokens is None:
            try:
                tokens: np.ndarray = np.load(self.path / TOKENS, mmap_mode="r")
            except (OSError, ValueError) as err:  # missing, or shorter than its header says
                raise SaelabError(f"{self.path / TOKENS} is missing or truncated",
                                  expected="int32 token ids [n_windows, context_size]",
                                  found=str(err).splitlines()[0],
                                  fix="delete the store folder and run `saelab cache` again"
                                  ) from err
            if tokens.shape != (self.manifest["n_windows"], self.context_size):
                raise SaelabError(f"{self.path / TOKENS} has the wrong shape",
                                  expected=f"({self.manifest['n_windows']}, {self.context_size})",
                                  found=str(tokens.shape),
                                  fix="delete the store folder and run `saelab cache` again")
            self._tokens = tokens
        return self._tokens

    def context(self, row: int) -> TokenContext:
        """The window row `row` came from, and the position of its token in it."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for a store of {len(self)} rows")
        window, offset = divmod(row, self.rows_per_window)
        position = offset + (self.context_size - self.rows_per_window)
        return TokenContext(window, position, self.token_ids()[window].tolist())
