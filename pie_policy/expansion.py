"""Adaptive expansion: how much of the KV cache may live in CPU memory, set online from what the GPU did.

The controller owns one number, `share`: the most the CPU may hold of the live KV blocks. Layer swapping
hides its copies as long as the host→device link moves an iteration's CPU-resident KV in no more time
than the GPU computes it. So the stall-free share follows from two measured times of an iteration that
streamed the whole batch (compute C; link busy H; stall S), with x = in_use / (1 - in_use) the CPU
blocks per GPU block now on the CPU:

    u = H / C, or (C + S) / C if that is larger and the GPU waited (the link needed at least that long)
    x_target = x · (1 - margin) / u,        target = x_target / (1 + x_target)

Transfer time is proportional to the CPU bytes, so target is where the link would be busy (1 - margin)
of compute had the batch's compute stayed the same; it grows with the batch, so the estimate is low from
below and the controller converges on the stall-free share s* in a few steps without crossing it.

- **Stalled** (S > tolerance · C): share = min(share, target). One cut to the estimated stall-free
  point, not a fraction of the share: a cut strands the sequences whose next block may no longer go to
  the CPU, so the controller never cuts further than the link requires, and a repeated stall of the
  same KV (blocks stay on the CPU until their sequences finish) gives the same target.
- **Limited, GPU did not wait** (a block the share refused would have fitted the CPU): share moves up
  to target, at most `max_step` per iteration (the batch must show what the new share costs before the
  next step); with nothing on the CPU yet there is nothing to measure, so it probes `step` up.
- Otherwise hold: between (1 - margin) and 1 + tolerance of link load nothing moves, so the share does
  not dither with the batch's noise.

Defaults: start 0 (Pie begins as vLLM and expands during warm-up), step 0.02, max_step 0.05,
tolerance 0.01, margin 0.05, max_share 0.5. Tested against a closed-form plant in tests/test_expansion.py.
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
    max_step: float = 0.05
    tolerance: float = 0.03
    margin: float = 0.05

    def __post_init__(self) -> None:
        check_share("max_share", self.max_share)
        check_share("share", self.share)
        if not 0 < self.step <= self.max_step < 1:
            raise ConfigError(f"need 0 < step <= max_step < 1, got {self.step}, {self.max_step}")
        if not (0 <= self.tolerance and 0 <= self.margin < 1):
            raise ConfigError("tolerance and margin must be >= 0 (margin < 1)")
        self.share = min(self.share, self.max_share)

    def stalled(self, stats: IterationStats) -> bool:
        return stats.stall_s > self.tolerance * stats.compute_s

    def target(self, stats: IterationStats, in_use: float) -> float | None:
        """The largest share whose copies the iteration's compute would hide, or None without a measurement."""
        compute, stall = stats.compute_s, stats.stall_s
        link = max(stats.h2d_busy_s, stats.d2h_busy_s, compute + stall if self.stalled(stats) else 0.0)
        if compute <= 0 or link <= 0 or in_use <= 0:
            return None
        x = in_use / (1 - in_use) * (1 - self.margin) * compute / link
        return x / (1 + x)

    def observe(self, stats: IterationStats, limited: bool, in_use: float) -> float:
        """Update and return the share after an iteration that computed every running sequence; `in_use`
        is the share of the live KV on the CPU, `limited` whether the share refused a block."""
        target = self.target(stats, in_use)
        if self.stalled(stats):
            if target is not None:  # no CPU KV in use: whatever the GPU waited for, the share did not cause it
                self.share = min(self.share, target)
        elif limited and self.share < self.max_share:
            rise = self.step if target is None else min(self.max_step, max(0.0, target - self.share))
            self.share = min(self.max_share, self.share + rise)
        return self.share
