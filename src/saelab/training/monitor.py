"""Warnings a run gives while it trains, for the two ways a run fails quietly.

- **collapse**: over a window of the last `window` steps (a tenth of the run, at least 20),
  the median FVU of the window's last quarter is at least 1.2x that of its first quarter,
  and at least 0.5 (half the variance lost), while the median L0 fell to 0.8x or less (and,
  with a target L0, below 0.9x the target): the sparsity penalty is winning over
  reconstruction, as a ReLU SAE with too large an L1 coefficient does (Gemma 3 270M: FVU 0.33
  at step 80, 0.97 at step 150, L0 falling to 14). A rise to a small FVU (0.05 to 0.1 as a
  warm-up's penalty arrives) is a trade-off, not a collapse.
  Under a controller L0 falling towards its target is expected, and only a fall through it
  counts. A code whose FVU stays at 0.98 or more (it collapsed early, or rebuilds nothing)
  counts too.
- **dead**: more than 10 % of the latents have not fired for `dead_tokens` tokens.

`observe` returns the warnings that hold at a step (metrics.jsonl and the progress line show
them); `advice` gives, for each warning raised during the run, what was seen and the flag to
change, for the run's summary.
"""

from __future__ import annotations

from collections import deque
from statistics import median
from typing import TYPE_CHECKING, Any

from saelab.training.sparsity import COLLAPSED_FVU

if TYPE_CHECKING:
    from saelab.training.config import TrainConfig

FVU_RISE, L0_FALL, LOST, DEAD_FRACTION = 1.2, 0.8, 0.5, 0.1


class RunMonitor:
    """Per-step FVU and L0 of the last `window` steps, and the warnings raised so far."""

    def __init__(self, config: TrainConfig) -> None:
        self.window = max(20, config.steps // 10)
        self.has_coefficient = config.sae_class().default_sparsity_coef > 0
        self.target = config.target_l0 if self.has_coefficient else None
        self.dead_tokens = config.dead_tokens
        self.fvu: deque[float] = deque(maxlen=self.window)
        self.l0: deque[float] = deque(maxlen=self.window)
        self.raised: dict[str, dict[str, float]] = {}
        """warning -> what was measured when it was first raised (step, values)."""

    def observe(self, metrics: dict[str, float]) -> list[str]:
        """Take one step's metrics; the warnings that hold now."""
        self.fvu.append(metrics["fvu"])
        self.l0.append(metrics["l0"])
        step, now = int(metrics["step"]), []
        collapse = self._collapse()
        if collapse is not None:
            now.append("collapse")
            self.raised.setdefault("collapse", {"step": step, **collapse,
                                                "sparsity_coef": metrics["sparsity_coef"]})
        if metrics["dead_fraction"] > DEAD_FRACTION:
            now.append("dead")
            self.raised.setdefault("dead", {"step": step,
                                            "dead_fraction": metrics["dead_fraction"]})
        return now

    def _collapse(self) -> dict[str, float] | None:
        if len(self.fvu) < self.window:
            return None
        q = max(1, self.window // 4)
        fvu, l0 = list(self.fvu), list(self.l0)
        fvu_a, fvu_b = median(fvu[:q]), median(fvu[-q:])
        l0_a, l0_b = median(l0[:q]), median(l0[-q:])
        nothing = fvu_b >= COLLAPSED_FVU  # collapsed already, during the warm-up
        rising = fvu_b >= FVU_RISE * fvu_a and fvu_b >= LOST and l0_b <= L0_FALL * l0_a
        if not rising and not nothing:
            return None
        if self.target is not None and l0_b >= 0.9 * self.target:
            return None
        return {"fvu_from": fvu_a, "fvu_to": fvu_b, "l0_from": l0_a, "l0_to": l0_b}

    def advice(self) -> list[str]:
        """One sentence per warning raised: what was seen, the likely cause, what to change."""
        out = []
        if "collapse" in self.raised:
            c = self.raised["collapse"]
            fix = ("lower --sparsity-coef (the controller's start) or raise --target-l0"
                   if self.target is not None else
                   f"lower --sparsity-coef (it was {c['sparsity_coef']:.3g}) or pass "
                   "--target-l0 to have it steered")
            seen = (f"FVU stayed at {c['fvu_to']:.3f} (the code rebuilds nothing) with L0 "
                    f"{c['l0_to']:.1f}" if c["fvu_to"] >= COLLAPSED_FVU else
                    f"FVU rose from {c['fvu_from']:.3f} to {c['fvu_to']:.3f} while L0 fell from "
                    f"{c['l0_from']:.1f} to {c['l0_to']:.1f}")
            out.append(f"collapse from step {int(c['step'])}: {seen}; the sparsity penalty "
                       f"outweighs reconstruction: {fix}")
        if "dead" in self.raised:
            d = self.raised["dead"]
            fix = ("lower --sparsity-coef or --lr, or lengthen --sparsity-warmup-steps"
                   if self.has_coefficient else "lower --lr or --n-latents")
            out.append(f"dead latents from step {int(d['step'])}: {d['dead_fraction']:.0%} had "
                       f"not fired for --dead-tokens {self.dead_tokens} tokens: {fix}")
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"fvu": list(self.fvu), "l0": list(self.l0), "raised": self.raised}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fvu.extend(state.get("fvu", []))
        self.l0.extend(state.get("l0", []))
        self.raised.update(state.get("raised", {}))
