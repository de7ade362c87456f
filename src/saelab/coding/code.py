"""`SparseCode`: what every coder returns, whatever the method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from saelab.errors import SaelabError
from saelab.io import atomic_write, read_safetensors


@dataclass(frozen=True)
class PursuitTrace:
    """What each selection step did, for every row."""

    residual_norm: Tensor  # [steps + 1, batch]: ||r|| before the first step and after each
    selected: Tensor  # [steps, batch] int64: latent chosen at each step, -1 once the row stopped
    span_cosine: Tensor  # [steps, batch]: cosine between the chosen latent's direction and the
    # span of the latents already selected (0 for the first; NaN once the row stopped)

    @staticmethod
    def cat(traces: list[PursuitTrace]) -> PursuitTrace:
        steps = max(t.selected.shape[0] for t in traces)

        def pad(x: Tensor, extra: int, value: float) -> Tensor:
            return torch.nn.functional.pad(x, (0, 0, 0, extra), value=value)

        return PursuitTrace(
            torch.cat([torch.cat([t.residual_norm, t.residual_norm[-1:].expand(
                steps - t.selected.shape[0], -1)]) for t in traces], dim=1),  # stopped: unchanged
            torch.cat([pad(t.selected, steps - t.selected.shape[0], -1) for t in traces], dim=1),
            torch.cat([pad(t.span_cosine, steps - t.selected.shape[0], torch.nan)
                       for t in traces], dim=1),
        )


@dataclass(frozen=True)
class SparseCode:
    """The non-zero latents of a batch of activations.

    Slots a row did not need (it stopped early, or the encoder fired fewer latents) hold
    value 0; their index is then meaningless.
    """

    indices: Tensor  # [batch, k] int64: latent index of each slot
    values: Tensor  # [batch, k]: latent activation of each slot
    trace: PursuitTrace | None = field(default=None, compare=False)  # pursuit with return_trace

    def __post_init__(self) -> None:
        if self.indices.shape != self.values.shape or self.indices.dim() != 2:
            raise ValueError(f"indices {tuple(self.indices.shape)} and values "
                             f"{tuple(self.values.shape)} must both be [batch, k]")

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __getitem__(self, rows: slice | Tensor) -> SparseCode:
        return SparseCode(self.indices[rows], self.values[rows])

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def l0(self) -> Tensor:
        """Non-zero latents per row [batch]."""
        return (self.values != 0).sum(dim=1)

    def support(self, n_latents: int) -> Tensor:
        """[batch, n_latents] bool: the latents with a non-zero value in each row (a latent
        in two slots counts once; an unused slot, value 0, marks nothing)."""
        on_BL = torch.zeros(len(self), n_latents, dtype=torch.int8, device=self.values.device)
        return on_BL.scatter_reduce_(1, self.indices, (self.values != 0).to(torch.int8),
                                     "amax").bool()

    def firing_counts(self, n_latents: int, chunk: int = 4096) -> Tensor:
        """How many rows each latent fires on [n_latents] int64 (the support's column sums,
        `chunk` rows at a time so memory stays bounded)."""
        counts_L = torch.zeros(n_latents, dtype=torch.int64, device=self.values.device)
        for at in range(0, len(self), chunk):
            counts_L += self[at:at + chunk].support(n_latents).sum(dim=0)
        return counts_L

    def to_dense(self, n_latents: int) -> Tensor:
        """The code as a dense [batch, n_latents] tensor (slots of one latent are summed)."""
        dense_BL = self.values.new_zeros(len(self), n_latents)
        return dense_BL.scatter_add_(1, self.indices, self.values)

    def decode(self, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
        """Reconstruction [batch, d_model] = sum of value x decoder row (+ b_dec)."""
        rows_BKD = W_dec[self.indices].to(self.values.dtype)
        x_hat_BD = torch.einsum("bk,bkd->bd", self.values, rows_BKD)
        return x_hat_BD if b_dec is None else x_hat_BD + b_dec.to(x_hat_BD.dtype)

    @staticmethod
    def from_dense(dense_BL: Tensor, k: int | None = None) -> SparseCode:
        """Keep each row's `k` largest-magnitude entries (default: as many as the fullest row
        has non-zeros), so a code from an encoder loses nothing."""
        if k is None:
            k = max(int((dense_BL != 0).sum(dim=1).max()), 1) if len(dense_BL) else 1
        values, indices = dense_BL.abs().topk(min(k, dense_BL.shape[1]), dim=1, sorted=False)
        return SparseCode(indices, dense_BL.gather(1, indices))

    @staticmethod
    def cat(codes: Sequence[SparseCode]) -> SparseCode:
        """Concatenate along the batch, padding narrower codes with zero-valued slots."""
        k = max(c.k for c in codes)
        pad = [(torch.nn.functional.pad(c.indices, (0, k - c.k)),
                torch.nn.functional.pad(c.values, (0, k - c.k))) for c in codes]
        traces = [c.trace for c in codes if c.trace is not None]
        return SparseCode(torch.cat([i for i, _ in pad]), torch.cat([v for _, v in pad]),
                          PursuitTrace.cat(traces) if len(traces) == len(codes) else None)

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write `indices` and `values` to a safetensors file (atomically)."""
        from safetensors.torch import save

        data = save({"indices": self.indices.contiguous().cpu(),
                     "values": self.values.contiguous().cpu()}, metadata=metadata)
        atomic_write(Path(path), lambda f: f.write(data))

    @staticmethod
    def load(path: str | Path) -> SparseCode:
        """Codes written by `save` (one clear error for a broken or foreign file)."""
        tensors = read_safetensors(Path(path))
        missing = {"indices", "values"} - set(tensors)
        if missing:
            raise SaelabError(f"{path} is not a saelab code file", expected="indices and values",
                              found=", ".join(sorted(tensors)) or "no tensors",
                              fix="write it with SparseCode.save (`saelab decompose` does)")
        if tensors["indices"].shape != tensors["values"].shape or tensors["indices"].dim() != 2:
            raise SaelabError(f"{path} holds codes of mismatched shapes",
                              expected="indices and values both [batch, k]",
                              found=f"{list(tensors['indices'].shape)} and "
                              f"{list(tensors['values'].shape)}",
                              fix="write it again with SparseCode.save")
        return SparseCode(tensors["indices"], tensors["values"])
