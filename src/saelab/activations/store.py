"""`ActivationStore`: a memory-mapped, read-only view of activations cached on disk.

A store is one folder per site:

    manifest.json        what, where from, how many, checksums, normalisation statistics
    tokens.npy           [n_windows, context_size] int32 token ids of every window
    acts_00000.npy ...   [rows, d_model] activations, rows in window order

Row r of the store is token `position_of(r)` of window `r // rows_per_window` (BOS positions
are left out by default, so a window contributes context_size - 1 rows). Shards are opened
with `np.load(mmap_mode="r")`: the store is never read into RAM as a whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.errors import SaelabError
from saelab.io import read_json, sha256_files

FORMAT = "saelab-activations/1"
MANIFEST = "manifest.json"
TOKENS = "tokens.npy"


@dataclass(frozen=True)
class TokenContext:
    """Where a row came from: its window's token ids and its position in that window."""

    window: int
    position: int
    token_ids: list[int]


def shard_name(index: int) -> str:
    return f"acts_{index:05d}.npy"


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

    def __init__(self, path: str | Path, site: str | None = None) -> None:
        self.path = resolve_store_dir(Path(path).expanduser(), site)
        self.manifest: dict[str, Any] = read_json(self.path / MANIFEST)
        if self.manifest.get("format") != FORMAT:
            raise SaelabError(f"{self.path / MANIFEST} is not a saelab activation store manifest",
                              expected=FORMAT, found=str(self.manifest.get("format")),
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
                fingerprint: str | None = None) -> None:
        """Raise unless the store was made from this model and site."""
        checks = [("model", model, self.model), ("site", site, self.site),
                  ("model fingerprint", fingerprint, self.manifest["model_fingerprint"])]
        for what, asked, found in checks:
            if asked is not None and asked != found:
                raise SaelabError(f"store {self.path} holds activations of another {what}",
                                  expected=str(asked), found=str(found),
                                  fix="pass a store cached from that model and site, or cache one "
                                  "with `saelab cache`")

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads the whole store once)."""
        for entry in self.manifest["shards"]:
            digest = sha256_files([self.path / entry["file"]])
            if digest != entry["sha256"]:
                raise SaelabError(f"shard {self.path / entry['file']} is corrupt (checksum)",
                                  expected=f"sha256 {entry['sha256']}", found=f"sha256 {digest}",
                                  fix="delete the store folder and run `saelab cache` again")

    # -- rows -------------------------------------------------------------------------------
    def __getitem__(self, index: int | slice | np.ndarray | Tensor) -> Tensor:
        """Rows as float32 [len(index), d_model] (or [d_model] for an int)."""
        if isinstance(index, int | np.integer):
            return self.rows(np.array([int(index)]))[0]
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        return self.rows(np.asarray(index, dtype=np.int64))

    def rows(self, index: np.ndarray) -> Tensor:
        """Rows at `index` [n] in that order, gathered shard by shard."""
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

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0,
                world_size: int = 1, block_rows: int = 1024, buffer_rows: int = 1 << 18,
                drop_last: bool = False) -> Iterator[Tensor]:
        """Batches [batch_size, d_model] of float32; a rank's batches are its own.

        Shuffling permutes blocks of `block_rows` contiguous rows (so reads stay sequential),
        deals them out to the ranks, then reads `buffer_rows` rows at a time and permutes the
        rows inside that buffer. The same seed always gives the same batches.
        """
        rng = np.random.default_rng(seed)
        n_blocks = -(-len(self) // block_rows)
        blocks = rng.permutation(n_blocks) if shuffle else np.arange(n_blocks)
        blocks = blocks[rank::world_size]
        per_buffer = max(1, buffer_rows // block_rows)
        carry = np.empty((0, self.d_model), dtype=np.float32)
        for start in range(0, len(blocks), per_buffer):
            chosen = np.sort(blocks[start:start + per_buffer])
            index = (chosen[:, None] * block_rows + np.arange(block_rows)).ravel()
            index = index[index < len(self)]  # [n] ascending
            perm = rng.permutation(len(index)) if shuffle else None
            data = np.empty((len(carry) + len(index), self.d_model), dtype=np.float32)  # [c + n, d]
            data[:len(carry)] = carry
            self._read_ascending(index, perm, data[len(carry):])
            n_full = len(data) // batch_size
            for b in range(n_full):
                yield torch.from_numpy(data[b * batch_size:(b + 1) * batch_size])
            carry = data[n_full * batch_size:]
        if len(carry) and not drop_last:
            yield torch.from_numpy(carry)

    def _read_ascending(self, index: np.ndarray, perm: np.ndarray | None, out: np.ndarray
                        ) -> None:
        """out[j] = row index[perm[j]] (row index[j] without `perm`), in one copy.

        Each contiguous run of the ascending `index` is read front to back from its shard's
        map and written straight to its rows of `out`: no gathered array in between, and cold
        pages are faulted in file order. (madvise SEQUENTIAL or WILLNEED, and preadv into a
        staging block, measured no faster on the store of benchmarks/extract.py.)
        """
        dest = None
        if perm is not None:  # the inverse permutation: row index[i] goes to out[dest[i]]
            dest = np.empty_like(perm)
            dest[perm] = np.arange(len(perm))
        cuts = np.flatnonzero((np.diff(index) != 1) | np.isin(index[1:], self._offsets)) + 1
        for a, b in zip([0, *cuts], [*cuts, len(index)]):  # runs inside one shard
            s = int(np.searchsorted(self._offsets, index[a], side="right")) - 1
            lo = int(index[a] - self._offsets[s])
            run = self._shards[s][lo:lo + b - a]  # [b - a, d_model], a view of the map
            if dest is None:
                out[a:b] = run
            else:
                out[dest[a:b]] = run

    # -- provenance ---------------------------------------------------------------------------
    @property
    def rows_per_window(self) -> int:
        return self.context_size - (1 if self.manifest["exclude_bos"] else 0)

    def token_ids(self) -> np.ndarray:
        """Token ids [n_windows, context_size] of every window (memory-mapped)."""
        if self._tokens is None:
            self._tokens = np.load(self.path / TOKENS, mmap_mode="r")
        return self._tokens

    def context(self, row: int) -> TokenContext:
        """The window row `row` came from, and the position of its token in it."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for a store of {len(self)} rows")
        window, offset = divmod(row, self.rows_per_window)
        position = offset + (self.context_size - self.rows_per_window)
        return TokenContext(window, position, self.token_ids()[window].tolist())
