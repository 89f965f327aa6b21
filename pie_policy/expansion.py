"""Adaptive expansion: how much of the KV cache may live in CPU memory, set online to serve the most tokens.

The controller owns one number, `share`: the most the CPU may hold of the live KV blocks. It starts at 0
(Pie begins as vLLM) and hears about every iteration that computed every running sequence (only such a
batch streams all the CPU-resident KV it measures). It weighs, in that iteration's seconds, what the CPU
share buys against what it costs:

- **a larger batch.** With x = CPU blocks per GPU block and the GPU full, the batch is (1 + x) times what
  the GPU alone holds. The batch's copy-free time T0 (the cost model's price of the batch with no copy in
  flight) has a part F that no batch changes (weights read once per layer, per-layer overheads): the
  same tokens served by the GPU alone, in batches 1 + x times smaller, would take T0 + x·F;
- **longer iterations.** Whatever makes the measured iteration T (end - start) longer than its copy-free
  time is what the CPU share costs: the layers' HBM contention with the copies, short waits on the link
  (the first layers' prefetch), issuing copy calls: y = (T - W) / (ρ·T0) - 1, with ρ the measured /
  copy-free ratio of the full iterations without copies (the cost model's error on this machine: 1 in the
  simulator, which prices with it). W is the iteration's wait where it passes `stall_tolerance` of
  compute, else 0: such a wait is the link saturating, which no share below the link's limit pays, so it
  is the ceiling's to act on, not a cost per unit x for J to extrapolate to every share (counted in y, one
  burst of it priced every share as a loss: the share fell to 0, and the small shares' evidence took
  hundreds of iterations to outweigh it);
- **fewer recomputed prefills.** A preemption the share caused (the running sequence's block would have
  fitted CPU memory, not the share) throws away its victim's KV, and a prefill recomputes it later; the
  policy prices that prefill on the cost model. π = those seconds per copy-free second of decode.

So the decode token rate with CPU share s = x / (1 + x), against the GPU alone on the same work, is

    J(x) = (1 + x·φ) / (1 + a·x),   φ = F / T0,   a = y / x

with a (the overhead per unit x: Σy / Σx) and φ averaged over the last `horizon` iterations that held CPU
KV (exponential weights), π over those and the ones the share limited, ρ over the ones without copies. J rises with x where φ > a
(weights dominate what a layer reads: expanding pays) and falls where φ < a (the copies' HBM traffic
costs more than the larger batch saves). **The control law:**

    acceptable = the shares s ≤ min(max_share, the largest share measured + step) with
                 J(s) ≥ max J - tolerance - π:
                 decode speed is given up for as much recomputation as the share is measured to cause
                 (and `tolerance` more: a larger share also shortens the queue, which J does not count)
    ceiling    = while the GPU waits more than `stall_tolerance` of compute (averaged over STALL_MEMORY
                 iterations), the share at which the link of an iteration that waited that long would
                 have kept up: in use · compute / (compute + wait) (its busy time scales with the CPU
                 bytes); raised a step after `relax_iterations` calm iterations. (Not "a step below the
                 share in use": where the link's bound is a step, that is 0, and lowered again while the
                 lagging average stays high, it chases the draining CPU KV below the link's limit)
    link       = the share at which the link would be busy (1 - margin) of compute, from its load per unit
                 x averaged over LINK_MEMORY iterations (each direction against compute, and a staging
                 slot's write-back plus the prefetch that reuses it against `prefetch_depth` layers)

    if the GPU is waiting:                    share = min(share, ceiling)
    elif share > largest acceptable:          share = max(largest acceptable, min(share, in use)), or a
                                              step below what is in use if that is not acceptable
    elif the share refused a block CPU memory had room for, and what is in use has caught up with it:
                                              share += step, but no further than the largest acceptable,
                                              the ceiling and the link share
    with nothing measured (or nothing for `stale_iterations` plans) and refused: a step up, forgetting
    the old measurements (the load may have changed).

An economic cut goes no more than a step below the share in use: further, it would preempt many running
sequences whose next block the share refuses, whereas the CPU KV drains as sequences finish (the share
follows it down a step at a time). Only waiting on the link cuts deeper, to where the link keeps up.

Deterministic and clock-free: the share is a function of the observations alone. An iteration with no CPU
KV whose share refused nothing (a plain decode) only updates ρ; where its measured time is its copy-free
price, as in the simulator, ρ stays 1 and the shares are the same whether a backend reports it or not.
Defaults: step 0.02, tolerance 0.005, horizon 200, stall_tolerance 0.03, margin 0.1, relax_iterations 500,
stale_iterations 2000, max_share 0.5. Tested against closed-form plants with HBM contention
(tests/test_expansion.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import ConfigError, check_share
from .plan import IterationStats

STALL_MEMORY = 8   # iterations the stall fraction is averaged over
LINK_MEMORY = 50   # iterations the link load is averaged over


@dataclass
class Evidence:
    """What the iterations said, exponentially weighted: sums over those that held CPU KV (weight, x, y,
    φ), over those and the ones the share limited (weight, π), over those without copies (weight,
    measured / copy-free), and short averages of the wait and the link load per unit x."""
    cpu: list[float] = field(default_factory=lambda: [0.0] * 4)
    pressure: list[float] = field(default_factory=lambda: [0.0, 0.0])
    free: list[float] = field(default_factory=lambda: [0.0, 0.0])  # weight, weight·(measured / copy-free)
    waited: float = 0.0
    load_per_x: float = 0.0
    top: float = 0.0      # the largest share measured
    last: int = -1        # the plan number of the last iteration with CPU KV

    def measure(self, iteration: int, x: float, y: float, phi: float, wait: float, load: float, keep: float):
        self.cpu = [keep * s + t for s, t in zip(self.cpu, (1.0, x, y, phi))]
        self.waited += (wait - self.waited) / STALL_MEMORY
        self.load_per_x += (load / x - self.load_per_x) / (LINK_MEMORY if self.load_per_x else 1)
        self.top, self.last = max(self.top, x / (1 + x)), iteration

    def press(self, pi: float, keep: float) -> None:
        self.pressure = [keep * self.pressure[0] + 1.0, keep * self.pressure[1] + pi]

    def calibrate(self, ratio: float, keep: float) -> None:
        self.free = [keep * self.free[0] + 1.0, keep * self.free[1] + ratio]

    @property
    def rho(self) -> float:
        w, wr = self.free
        return wr / w if w > 0 else 1.0

    @property
    def pi(self) -> float:
        w, wpi = self.pressure
        return wpi / w if w > 0 else 0.0

    @property
    def economics(self) -> tuple[float, float] | None:
        """(a, φ), or None before an iteration with CPU KV."""
        w, wx, wy, wphi = self.cpu
        return (wy / wx, wphi / w) if wx > 0 else None


def _j(a: float, phi: float, share: float) -> float:
    """J at `share` for the measured economics (a, φ): (1 + x·φ) / (1 + a·x), x = share / (1 - share)."""
    x = share / (1 - share)
    return (1 + x * phi) / (1 + a * x)


@dataclass
class ExpansionController:
    share: float = 0.0
    max_share: float = 0.5
    step: float = 0.02
    tolerance: float = 0.005
    horizon: int = 200
    stall_tolerance: float = 0.03
    margin: float = 0.1
    prefetch_depth: int = 1
    relax_iterations: int = 500
    stale_iterations: int = 2000
    evidence: Evidence = field(default_factory=Evidence)
    ceiling: float = 1.0  # where the link of the last iteration that waited on it would have kept up
    calm: int = 0         # iterations with CPU KV since the GPU last waited (or the ceiling last rose)

    def __post_init__(self) -> None:
        check_share("max_share", self.max_share)
        check_share("share", self.share)
        if not 0 < self.step < 1:
            raise ConfigError(f"step must be in (0, 1), got {self.step}")
        if not (0 <= self.tolerance < 1 and 0 <= self.stall_tolerance and 0 <= self.margin < 1):
            raise ConfigError("tolerance, stall_tolerance and margin must be >= 0 (tolerance and margin < 1)")
        for name in ("horizon", "prefetch_depth", "relax_iterations", "stale_iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.share = min(self.share, self.max_share)

    # ---- what the evidence says
    def link_load(self, stats: IterationStats) -> float:
        """How busy the link was against compute: each direction must keep up with compute, and a staging
        slot's write-back and the prefetch that reuses it share the `prefetch_depth` layers between them
        (layerswap.py); a wait longer than `stall_tolerance` of compute means the link needed at least
        compute + stall (a shorter one is the first layers' prefetch after the batch changed)."""
        compute, stall, h2d, d2h = stats.compute_s, stats.stall_s, stats.h2d_busy_s, stats.d2h_busy_s
        waited = stall > self.stall_tolerance * compute
        link = max(h2d, d2h, (h2d + d2h) / self.prefetch_depth, compute + stall if waited else 0.0)
        return link / compute if compute > 0 else 0.0

    @property
    def link_share(self) -> float | None:
        """The share at which the link would be busy (1 - margin) of compute (busy time scales with the
        CPU bytes), or None before an iteration with CPU KV."""
        if self.evidence.load_per_x <= 0:
            return None
        x = (1 - self.margin) / self.evidence.load_per_x
        return x / (1 + x)

    def predicted(self, share: float) -> float | None:
        """J at `share` (1 at 0), or None before an iteration with CPU KV."""
        economics = self.evidence.economics
        if economics is None:
            return None
        return _j(*economics, share)

    def largest_acceptable(self) -> float | None:
        """The largest share up to `max_share` and a step past the largest measured whose J is within
        `tolerance` + π of the best (J is monotone in x: the best is at 0 or at the top), or None."""
        economics = self.evidence.economics
        if economics is None:
            return None
        a, phi = economics
        top = min(self.max_share, self.evidence.top + self.step)
        at_top = _j(a, phi, top)
        floor = max(1.0, at_top) - self.tolerance - self.evidence.pi
        if at_top >= floor:
            return top
        # (1 + x·φ) / (1 + a·x) = floor, J falling (φ < a·floor)
        x = (1 - floor) / (a * floor - phi)
        return min(top, x / (1 + x))

    # ---- the law
    def observe(self, stats: IterationStats, *, limited: bool, in_use: float, copy_free_s: float,
                fixed_s: float, refused_s: float = 0.0) -> float:
        """Update and return the share after an iteration that computed every running sequence.
        `in_use`: the share of the live KV blocks on the CPU; `limited`: whether the share refused a block
        CPU memory had room for; `copy_free_s`: the cost model's seconds for the batch with no copies in
        flight; `fixed_s`: the part of those that no batch changes; `refused_s`: the cost model's seconds
        to recompute what the preemptions the share caused (since the last call) threw away."""
        if copy_free_s <= 0:
            return self.share
        keep = 1 - 1 / self.horizon
        seconds = stats.end_s - stats.start_s
        if not (in_use > 0 or limited):
            if stats.bytes_h2d == stats.bytes_d2h == 0:
                self.evidence.calibrate(seconds / copy_free_s, keep)
            return self.share  # nothing measured with CPU KV, nothing asked for
        if stats.iteration - self.evidence.last > self.stale_iterations:
            self.evidence = Evidence(free=self.evidence.free)
        if in_use > 0:
            x, rho = in_use / (1 - in_use), self.evidence.rho
            wait = stats.stall_s / stats.compute_s if stats.compute_s > 0 else 0.0
            saturated = stats.stall_s if wait > self.stall_tolerance else 0.0  # the ceiling's, not a's
            self.evidence.measure(stats.iteration, x, (seconds - saturated) / (rho * copy_free_s) - 1,
                                  fixed_s / copy_free_s, wait, self.link_load(stats), keep)
        self.evidence.press(refused_s / copy_free_s, keep)
        self._learn_ceiling(in_use, stats)
        largest = self.largest_acceptable()
        if largest is None:
            if limited:
                self.share = min(self.max_share, self.ceiling, self.share + self.step)
        elif self.share > largest:
            self.share = max(largest, min(self.share, in_use - self.step if in_use > largest else in_use))
        elif limited and in_use >= self.share - self.step / 2:
            up = min(self.share + self.step, largest, self.max_share, self.ceiling)
            link = self.link_share
            self.share = up if link is None else max(self.share, min(up, link))
        return self.share

    def _learn_ceiling(self, in_use: float, stats: IterationStats) -> None:
        """While the GPU waits, an iteration that waited more than `stall_tolerance` of compute sets the
        ceiling to the share at which its link would have kept up (busy time scales with the CPU bytes:
        in use x compute / (compute + stall)), and the share no higher; after `relax_iterations` calm
        iterations with CPU KV it rises a step."""
        if in_use <= 0:
            return
        if self.evidence.waited > self.stall_tolerance:
            if stats.stall_s > self.stall_tolerance * stats.compute_s:
                self.ceiling = min(self.ceiling, in_use * stats.compute_s / (stats.compute_s + stats.stall_s))
            self.share, self.calm = min(self.share, self.ceiling), 0
        else:
            self.calm += 1
            if self.calm >= self.relax_iterations:
                self.ceiling, self.calm = min(1.0, self.ceiling + self.step), 0
