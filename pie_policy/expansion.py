"""Adaptive expansion: how much of the KV cache may live in CPU memory, set online from what the GPU did.

The controller owns one number, `share`: the most the CPU may hold of the sequences' KV blocks. After
each iteration it reads the stats (compute time C, stall time S spent waiting on copies):

- **Back off when the GPU waited** (S > tolerance · C). Transfer time grows with the CPU-resident bytes,
  so the largest share whose copies hide under compute is about in_use · C / (C + S), where in_use is
  the share of the KV actually on the CPU; the controller sets its share there, `margin` lower, and
  halves its growth step. Blocks already on the CPU stay there until their sequences finish, so while
  in_use is still above the share (an earlier cut has not taken effect) it does not cut again: cutting
  on every stalled iteration of that lag would drive the share to zero.
- **Grow while the GPU does not wait**, but only when the share limited the batch this iteration
  (`limited`: the scheduler wanted a block the share refused): share += step, up to `max_share`. After
  `patience` stall-free growth steps in a row the step doubles again (up to `max_step`), so a link that
  gets faster is found again.
- Otherwise hold.

Parameters (defaults): start 0 (Pie begins as vLLM and expands during warm-up), step 0.02, step bounds
[0.0025, 0.08], tolerance 0.01, margin 0.02, patience 8, max_share 0.5. From 0 the share reaches a
stall-free optimum s* within s*/0.02 + a few iterations; after each back-off it lands within `margin`
below the stall point, and the halving steps make its probes above s* geometrically smaller, so it
settles within 0.5% + margin of s* in about log2(0.02 / 0.0025) = 3 back-offs more (tested against a
closed-form plant in tests/test_expansion.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ConfigError, check_share
from .plan import IterationStats


@dataclass
class ExpansionController:
    share: float = 0.0
    max_share: float = 0.5
    step: float = 0.02
    min_step: float = 0.0025
    max_step: float = 0.08
    tolerance: float = 0.01
    margin: float = 0.02
    patience: int = 8
    _calm: int = 0  # stall-free growth steps in a row

    def __post_init__(self) -> None:
        check_share("max_share", self.max_share)
        check_share("share", self.share)
        if not 0 < self.min_step <= self.step <= self.max_step < 1:
            raise ConfigError(f"need 0 < min_step <= step <= max_step < 1, got "
                              f"{self.min_step}, {self.step}, {self.max_step}")
        if not (0 <= self.tolerance and 0 <= self.margin < 1 and self.patience >= 1):
            raise ConfigError("tolerance and margin must be >= 0 (margin < 1), patience >= 1")
        self.share = min(self.share, self.max_share)

    def observe(self, stats: IterationStats, limited: bool, in_use: float) -> float:
        """Update and return the share after one iteration; `in_use` is the share of KV on the CPU now."""
        compute, stall = stats.compute_s, stats.stall_s
        if compute > 0 and stall > self.tolerance * compute:
            if in_use <= self.share + 1e-12:
                self.share = in_use * compute / (compute + stall) * (1 - self.margin)
                self.step = max(self.min_step, self.step / 2)
            self._calm = 0
        elif limited and self.share < self.max_share:
            self.share = min(self.max_share, self.share + self.step)
            self._calm += 1
            if self._calm >= self.patience:
                self.step, self._calm = min(self.max_step, self.step * 2), 0
        return self.share
