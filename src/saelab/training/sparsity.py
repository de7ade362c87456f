"""The sparsity coefficient over a run: ramped up from 0 over the warm-up, then fixed, or,
with a target L0, steered by a controller until the code's L0 is the target.

The controller (`L0Controller`) takes over after the warm-up, from the starting coefficient
clipped into the range the architecture gives (`SAE.sparsity_control`). It tracks a
reference that falls from the L0 at the end of the warm-up to the target, linearly in log
L0, over the next `REFERENCE_FRACTION` of the run, and then stays at the target. Each step:

    error = log L0_smooth + HORIZON * slope - log L0_reference(step)
    coef += pace * rate * (high - max(low, 0)) * clamp(error, -CLAMP, CLAMP)

with L0_smooth a moving average of the step's L0 (a mean over thousands of tokens), `slope`
the moving average of its change per step, `pace` the learning rate's share of its peak, and
`rate` the architecture's (`rate_up` when the error is positive, `rate_down` when negative);
the coefficient stays within [low, high]. Why each part:

- **A falling reference, not a fixed target from the start.** A ReLU SAE's L0 starts near
  n_latents / 2 and falls only as its dictionary learns; a coefficient pushed up as long as
  the L0 is far from the target outruns it (on Gemma 3 270M it reached 44 while the L0 was
  still 1,000, and the code collapsed).
- **Where L0 is going, not only where it is** (`HORIZON` steps of the slope): the L0 answers
  a change of coefficient tens of steps later, and an integral controller that waits for
  it oscillates (a JumpReLU's L0 swung between 2 and 100 with 20 steps counted ahead; with
  50 it settled within 2 % of the target).
- **At the learning rate's pace**: the L0 moves only as fast as the weights do, so while the
  rate decays at the end of the run the controller slows with it.
- **A range from the architecture**: beyond the top of it the target L0 can only be reached
  by a collapsed code (for ReLU, shrinkage alone would cost all the variance), so a
  coefficient 100x too large starts at the top and a coefficient 100x too small climbs at
  the same pace as any other (the steps are a share of the range, not of the coefficient).
- **A collapse guard**: a collapsed ReLU code can sit at the target L0 with FVU 1 (every
  activation tiny), so while a step's FVU is `COLLAPSED_FVU` or more and the L0 is on
  course the error counts as -CLAMP.
"""

from __future__ import annotations

import math
from typing import Any

from saelab.saes import SparsityControl

REFERENCE_FRACTION = 0.4
CLAMP = 2.0
HORIZON = 50  # steps of the slope counted ahead
SMOOTH, SLOPE_SMOOTH = 0.1, 0.05
COLLAPSED_FVU = 0.98


class L0Controller:
    """Holds the coefficient and moves it, within the architecture's range, so the L0 follows
    the reference down to `target`."""

    def __init__(self, start: float, target: float, steps: int, control: SparsityControl
                 ) -> None:
        if not target > 0 or not control.low < control.high:
            raise ValueError(f"the controller needs a positive target and low < high, got "
                             f"target={target}, {control}")
        self.control, self.target = control, target
        self.coef = min(max(start, control.low), control.high)
        self.reference_steps = max(1, round(REFERENCE_FRACTION * steps))
        self.first_log_l0: float | None = None
        self.log_l0 = 0.0  # EMA of log L0
        self.slope = 0.0  # EMA of its change per step

    def reference(self, step: int) -> float:
        """log L0 the run should be at after `step` steps."""
        start = self.first_log_l0 if self.first_log_l0 is not None else math.log(self.target)
        done = min(1.0, step / self.reference_steps)
        return start + done * (math.log(self.target) - start)

    def update(self, step: int, l0: float, fvu: float, pace: float) -> None:
        """After the `step`-th controlled step (0 the first after the warm-up), from its L0
        and FVU; `pace` is the step's learning rate over the run's peak rate."""
        x = math.log(max(l0, 1e-3))
        if self.first_log_l0 is None:
            self.first_log_l0 = self.log_l0 = max(x, math.log(self.target))
        previous, self.log_l0 = self.log_l0, self.log_l0 + SMOOTH * (x - self.log_l0)
        self.slope += SLOPE_SMOOTH * (self.log_l0 - previous - self.slope)
        error = self.log_l0 + HORIZON * self.slope - self.reference(step)
        if fvu >= COLLAPSED_FVU and error <= 0 and step > self.reference_steps // 4:
            error = -CLAMP  # L0 on course, but the code rebuilds nothing
        c = self.control
        rate = c.rate_up if error > 0 else c.rate_down
        move = pace * rate * (c.high - max(c.low, 0.0)) * max(-CLAMP, min(CLAMP, error))
        self.coef = min(max(self.coef + move, c.low), c.high)

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "first_log_l0": self.first_log_l0,
                "log_l0": self.log_l0, "slope": self.slope}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef, self.first_log_l0 = float(state["coef"]), state["first_log_l0"]
        self.log_l0, self.slope = float(state["log_l0"]), float(state["slope"])


class SparsitySchedule:
    """The coefficient each step uses: ramped up over `warmup_steps` to `start`, then fixed,
    or (with `target_l0` and a class that gives a `SparsityControl`) an `L0Controller`'s,
    starting from `start` clipped into the class's range."""

    def __init__(self, start: float, warmup_steps: int, target_l0: float | None,
                 steps: int, control: SparsityControl | None) -> None:
        self.warmup_steps = max(1, warmup_steps)
        self.start = start
        self.controller = (L0Controller(start, target_l0, steps, control)
                           if target_l0 is not None and control is not None else None)

    def coef(self, step: int) -> float:
        """The coefficient of step `step` (0-based)."""
        ramp = min(1.0, (step + 1) / self.warmup_steps)
        return ramp * (self.controller.coef if self.controller is not None else self.start)

    def observe(self, step: int, l0: float, fvu: float, pace: float) -> None:
        """After step `step` (1-based): the controller learns from its L0 and FVU, at the
        learning rate's pace (the L0 moves only as fast as the weights do)."""
        if self.controller is not None and step >= self.warmup_steps:
            self.controller.update(step - self.warmup_steps, l0, fvu, pace)

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict() if self.controller is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.controller is not None and state:
            self.controller.load_state_dict(state)
