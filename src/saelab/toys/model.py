"""The ReLU output toy model of Elhage et al. 2022, many instances trained at once.

    h = W x,    x' = ReLU(W^T h + b),    loss = sum_i I_i (x_i - x'_i)^2

x in R^n holds n features, each 0 with probability S (the sparsity) and otherwise uniform on
[0, 1]; W is [m, n] (here stored per feature, `W_IFH` [instances, n_features, d_hidden]) and
b is [n]. As in the paper's code, an instance axis runs through every tensor, so a sweep
over sparsity, importance or dropout is one model trained with one optimiser: each instance
has its own feature probability, importance and dropout rates, and its own weights, and the
instances never interact (the loss is a sum over instances).

Dropout (not in the paper): on the hidden layer, h_j is zeroed with probability q and the
survivors scaled by 1 / (1 - q) during training; on the inputs, features are dropped the same
way before W while the loss still compares with the clean x (a denoising objective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Instances:
    """What varies from one instance to the next: one entry per instance."""

    feature_probability: Tensor  # [I]: chance a feature is non-zero, 1 - sparsity
    importance: Tensor  # [I, F]: loss weight of each feature
    hidden_dropout: Tensor  # [I]: dropout rate on h during training
    input_dropout: Tensor  # [I]: dropout rate on x (before W) during training

    def __len__(self) -> int:
        return len(self.feature_probability)

    @property
    def n_features(self) -> int:
        return self.importance.shape[1]

    @staticmethod
    def grid(n_features: int, sparsity: list[float], *, importance_decay: float = 1.0,
             hidden_dropout: tuple[float, ...] = (0.0,), input_dropout: float = 0.0,
             repeats: int = 1) -> Instances:
        """Every (sparsity, hidden dropout) pair, `repeats` times each (sparsity varies
        slowest, repeats fastest), with importance I_i = importance_decay^i."""
        S, Q, _ = torch.meshgrid(torch.tensor(sparsity, dtype=torch.float64),
                                 torch.tensor(hidden_dropout, dtype=torch.float64),
                                 torch.arange(repeats, dtype=torch.float64), indexing="ij")
        n = S.numel()
        importance_F = importance_decay ** torch.arange(n_features, dtype=torch.float64)
        return Instances((1 - S).reshape(-1).float(), importance_F.float().expand(n, -1),
                         Q.reshape(-1).float(), torch.full((n,), float(input_dropout)))


class ToyModel(nn.Module):
    """`instances` independent ReLU output models of n_features -> d_hidden -> n_features."""

    def __init__(self, n_instances: int, n_features: int, d_hidden: int, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        # Xavier normal per instance: std sqrt(2 / (fan_in + fan_out)) of W [m, n]
        std = math.sqrt(2.0 / (n_features + d_hidden))
        self.W_IFH = nn.Parameter(torch.randn(n_instances, n_features, d_hidden,
                                              generator=generator) * std)
        self.b_IF = nn.Parameter(torch.zeros(n_instances, n_features))

    def forward(self, x_IBF: Tensor, hidden_keep_IBH: Tensor | None = None) -> Tensor:
        """x' [I, B, F] from x [I, B, F]; `hidden_keep_IBH` scales h (a dropout mask)."""
        h_IBH = torch.einsum("ibf,ifh->ibh", x_IBF, self.W_IFH)
        if hidden_keep_IBH is not None:
            h_IBH = h_IBH * hidden_keep_IBH
        return torch.relu(torch.einsum("ibh,ifh->ibf", h_IBH, self.W_IFH) + self.b_IF[:, None])


def sample_features(instances: Instances, batch_size: int, generator: torch.Generator,
                    device: torch.device | str = "cpu") -> Tensor:
    """A batch x [I, B, F]: each feature U[0, 1] with its instance's probability, else 0."""
    shape = (len(instances), batch_size, instances.n_features)
    value_IBF = torch.rand(shape, generator=generator, device=device)
    on_IBF = torch.rand(shape, generator=generator, device=device) \
        < instances.feature_probability.to(device)[:, None, None]
    return value_IBF * on_IBF


def expected_loss(model: ToyModel, instances: Instances, n_samples: int = 1 << 16,
                  seed: int = 0, chunk: int = 4096) -> Tensor:
    """Each instance's loss [I] without dropout, on n_samples fresh inputs shared by all
    instances (the same uniforms, thresholded at each instance's probability), so instances
    with the same settings compare on equal terms."""
    gen = torch.Generator().manual_seed(seed)
    device = model.b_IF.device
    p_I11 = instances.feature_probability[:, None, None]
    importance_IF = instances.importance.to(device)
    total_I = torch.zeros(len(instances), dtype=torch.float64)
    for start in range(0, n_samples, chunk):  # bounded memory: [I, chunk, F] at a time
        shape = (1, min(chunk, n_samples - start), instances.n_features)
        value_1BF, draw_1BF = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)
        x_IBF = (value_1BF * (draw_1BF < p_I11)).to(device)
        with torch.no_grad():
            total_I += importance_loss(x_IBF, model(x_IBF), importance_IF).cpu() * shape[1]
    return (total_I / n_samples).float()


def dropout_scale(rate_I: Tensor, shape: tuple[int, ...], generator: torch.Generator,
                  device: torch.device | str) -> Tensor:
    """Inverted-dropout multipliers of `shape`, [I, B, F] or [I, B, H]: 0 with probability
    rate, else 1 / (1 - rate)."""
    rate = rate_I.to(device)[:, None, None]
    keep = torch.rand(shape, generator=generator, device=device) >= rate
    return keep / (1 - rate)


def importance_loss(x_IBF: Tensor, x_hat_IBF: Tensor, importance_IF: Tensor) -> Tensor:
    """Per-instance loss [I]: mean over batch and features of I_i (x_i - x'_i)^2 (the paper
    code's reduction); the training loss is its sum over instances."""
    return (importance_IF[:, None] * (x_IBF - x_hat_IBF) ** 2).mean(dim=(1, 2))


def train_toy(instances: Instances, d_hidden: int, *, steps: int = 10_000,
              batch_size: int = 1024, lr: float = 1e-3, weight_decay: float = 1e-2,
              seed: int = 0, device: str = "cpu", progress: bool = True
              ) -> tuple[ToyModel, Tensor]:
    """Train all instances together with AdamW (the paper: lr 1e-3, batch 1024, 10,000
    steps, torch's default weight decay 0.01, constant rate); return the model in eval mode
    and the last step's per-instance loss [I]."""
    gen = torch.Generator(device).manual_seed(seed)
    init_gen = torch.Generator().manual_seed(seed)
    model = ToyModel(len(instances), instances.n_features, d_hidden,
                     generator=init_gen).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    importance_IF = instances.importance.to(device)
    use_hidden = bool((instances.hidden_dropout > 0).any())
    use_input = bool((instances.input_dropout > 0).any())
    loss_I = torch.zeros(len(instances))
    for _ in tqdm(range(steps), desc="toy", unit="step", disable=None if progress else True):
        x_IBF = sample_features(instances, batch_size, gen, device)
        x_in_IBF = x_IBF * dropout_scale(instances.input_dropout, x_IBF.shape, gen, device) \
            if use_input else x_IBF
        keep_IBH = dropout_scale(instances.hidden_dropout, (len(instances), batch_size,
                                 d_hidden), gen, device) if use_hidden else None
        loss_I = importance_loss(x_IBF, model(x_in_IBF, keep_IBH), importance_IF)
        opt.zero_grad(set_to_none=True)
        loss_I.sum().backward()
        opt.step()
    return model.eval(), loss_I.detach().cpu()
