"""The host↔GPU copy engines, exactly: a closed form when rates never change, else a fluid model advanced
from event to event.

Rules (shared with the SimPy per-layer mode in `layer_events.py`, which checks them independently):
- Streams: one FIFO stream per direction when the link has two or more copy engines, else one stream
  that both directions share. A stream runs one copy at a time, in issue order.
- A copy is ready once issued and once the copies it is ordered `after` have completed; it starts when it
  is ready and its stream is free. It first pays `calls · transfer_latency` (no bandwidth used), then
  moves its bytes.
- A direction moves bytes at its own bandwidth; while both directions move bytes at once, each runs at
  its bandwidth · min(1, bidirectional / (h2d + d2h)). Rates change only when a transfer starts or ends.

When the cap covers both directions at full speed (NVLink-C2C), or one stream serves both, no rate ever
changes and a copy's start and end follow from its issue: `FixedRateLinks`, O(1) a copy. Otherwise
(PCIe hosts) `FluidLinks` steps through the events. `links_for` picks.
"""
from __future__ import annotations

from collections import deque

from hwmodels import HardwareSpec
from pie_policy.plan import D2H, H2D, Copy

EPSILON = 1e-15
INF = float("inf")
DIRECTIONS = (H2D, D2H)   # FluidLinks' slot order


def byte_rates(hw: HardwareSpec, moving: set[str]) -> dict[str, float]:
    """Bytes/s of each direction in `moving` (the directions transferring bytes right now)."""
    link = hw.link
    full = {H2D: link.h2d_bandwidth, D2H: link.d2h_bandwidth}
    shared = min(1.0, link.bidirectional_bandwidth / (full[H2D] + full[D2H])) if len(moving) == 2 else 1.0
    return {d: full[d] * shared for d in moving}


def stream_of(hw: HardwareSpec, copy: Copy) -> str:
    return copy.direction if hw.link.copy_engines >= 2 else "both"


def links_for(hw: HardwareSpec):
    link = hw.link
    fixed = link.copy_engines < 2 or link.bidirectional_bandwidth >= link.h2d_bandwidth + link.d2h_bandwidth
    return FixedRateLinks(hw) if fixed else FluidLinks(hw)


class FixedRateLinks:
    """Start = max(issue, the stream's previous end, the ends of the copies it is `after`);
    end = start + calls · latency + bytes / bandwidth."""

    def __init__(self, hw: HardwareSpec):
        self.hw, self.now = hw, 0.0
        self.free: dict[str, float] = {}                 # stream → when its last copy ends
        self.started: dict[int, float] = {}
        self.done: dict[int, float] = {}
        self.busy = {H2D: 0.0, D2H: 0.0}
        self.windows: dict[str, deque] = {}              # stream → (bytes start, end, bandwidth), by time
        self.bandwidth = {H2D: hw.link.h2d_bandwidth, D2H: hw.link.d2h_bandwidth}
        self.latency = hw.link.transfer_latency

    def issue(self, copy: Copy, at: float) -> None:
        stream = stream_of(self.hw, copy)
        start = max(at, self.free.get(stream, 0.0), *[self.done[op] for op in copy.after])
        moving = start + copy.calls * self.latency
        bandwidth = self.bandwidth[copy.direction]
        end = moving + copy.nbytes / bandwidth
        self.started[copy.op_id], self.done[copy.op_id], self.free[stream] = start, end, end
        self.busy[copy.direction] += end - start
        if stream in self.windows:
            self.windows[stream].append((moving, end, bandwidth))
        else:
            self.windows[stream] = deque([(moving, end, bandwidth)])

    def completion(self, op_id: int) -> float:
        return self.done[op_id]

    def idle(self, at: float) -> bool:
        """Whether every copy issued so far has completed by `at`."""
        return all(end <= at for end in self.free.values())

    def advance(self, until: float) -> None:
        self.now = max(self.now, until)
        for window in self.windows.values():
            while window and window[0][1] <= self.now:
                window.popleft()

    def moving_rate(self) -> float:
        """Bytes/s moving over the link now, both directions together (after `advance`)."""
        total = 0.0
        for window in self.windows.values():
            if window and window[0][0] <= self.now:
                total += window[0][2]
        return total


class FluidLinks:
    """The event-stepped model, for links with a stream per direction (`links_for` gives it no other):
    each stream is one fixed slot (the copy it runs, when that copy's latency ends, the bytes it has left)
    and the rates of the three moving states are worked out once, because the step loop runs a few times
    per layer of every iteration that copies. A step is the rules' arithmetic, in the same order as the
    plain model in tests/test_links.py, so that both give the same times bit for bit."""

    def __init__(self, hw: HardwareSpec):
        if hw.link.copy_engines < 2:
            raise ValueError(f"{hw.name}: FluidLinks needs a stream per direction (copy_engines >= 2)")
        self.hw, self.now = hw, 0.0
        self.latency = hw.link.transfer_latency
        self.queues = (deque(), deque())          # per slot: (issue time, copy) not started, in issue order
        self.copy: list[Copy | None] = [None, None]   # per slot: the copy running, or None
        self.setup_until = [0.0, 0.0]             # per slot: when the running copy's per-call latency ends
        self.remaining = [0.0, 0.0]               # per slot: bytes it still has to move
        self.negligible = [0.0, 0.0]              # per slot: remaining bytes that count as none (rounding)
        self.started: dict[int, float] = {}       # op id → start time
        self.done: dict[int, float] = {}          # op id → completion time
        self.seconds = [0.0, 0.0]                 # per slot: seconds spent on copies (setup + bytes)
        # Indexed by which slots move bytes (bit 0: H2D, bit 1: D2H): each slot's rate, and their sum.
        moving_sets = ((), (H2D,), (D2H,), (H2D, D2H))
        self.rates = tuple(tuple(byte_rates(hw, set(m)).get(d, 0.0) for d in DIRECTIONS) for m in moving_sets)
        self.total_rate = tuple(sum(byte_rates(hw, set(m)).values()) for m in moving_sets)

    @property
    def busy(self) -> dict[str, float]:
        """Seconds each direction has spent on copies (setup + bytes)."""
        return dict(zip(DIRECTIONS, self.seconds))

    def issue(self, copy: Copy, at: float) -> None:
        if at < self.now - EPSILON:
            raise ValueError(f"copy {copy.op_id} issued at {at} before the links' clock {self.now}")
        self.queues[copy.direction == D2H].append((at, copy))

    def moving_rate(self) -> float:
        """Bytes/s moving over the link now, both directions together (after `advance`)."""
        return self.total_rate[self._moving()]

    def idle(self, at: float) -> bool:
        """Whether every copy issued so far has completed by `at` (advancing the model to `at`)."""
        self.advance(at)
        return self.copy == [None, None] and not (self.queues[0] or self.queues[1])

    def completion(self, op_id: int) -> float:
        """When copy `op_id` completes, advancing the model as far as that."""
        if not self._steps(INF, op_id):
            raise RuntimeError(f"copy {op_id} can never complete (not issued, or waits on one that is not)")
        return self.done[op_id]

    def advance(self, until: float) -> None:
        """Run the model to time `until` (copies issued later start no earlier than that)."""
        self._steps(until)
        if until > self.now:
            self._move_to(until)
            self._start_ready()

    def _moving(self) -> int:
        """Which slots move bytes now: bit 0 H2D, bit 1 D2H."""
        soon, copy, setup_until = self.now + EPSILON, self.copy, self.setup_until
        return ((copy[0] is not None and setup_until[0] <= soon)
                | (copy[1] is not None and setup_until[1] <= soon) << 1)

    def _steps(self, until: float, op_id: int | None = None) -> bool:
        """Step from event to event up to `until` (or until copy `op_id` completes): the hot loop, so the
        two slots are written out and the rates looked up; it returns whether `op_id` has completed."""
        done, queues, copy, setup_until, remaining = self.done, self.queues, self.copy, self.setup_until, self.remaining
        negligible, seconds, rates_of = self.negligible, self.seconds, self.rates
        now = self.now
        q0, q1 = queues
        while op_id not in done:
            soon = now + EPSILON
            if (copy[0] is None and q0 and q0[0][0] <= soon and self._ready(q0[0][1])) or (
                    copy[1] is None and q1 and q1[0][0] <= soon and self._ready(q1[0][1])):
                self._start_ready()
            c0, c1 = copy
            m0 = c0 is not None and setup_until[0] <= soon
            m1 = c1 is not None and setup_until[1] <= soon
            r0, r1 = rates_of[m0 | m1 << 1]
            t = INF
            if c0 is not None:
                if m0:
                    t = now + remaining[0] / r0
                    if t == now:
                        remaining[0] = 0.0
                else:
                    t = setup_until[0]
            if c1 is not None:
                if m1:
                    e = now + remaining[1] / r1
                    if e == now:
                        remaining[1] = 0.0
                else:
                    e = setup_until[1]
                if e < t:
                    t = e
            if q0 and soon < q0[0][0] < t:
                t = q0[0][0]
            if q1 and soon < q1[0][0] < t:
                t = q1[0][0]
            if t > until or t == INF:
                return op_id in done
            soon = t + EPSILON
            dt = t - now
            if c0 is not None:
                seconds[0] += dt
                if m0:
                    remaining[0] -= r0 * dt
                if setup_until[0] <= soon and remaining[0] <= negligible[0]:
                    done[c0.op_id] = t
                    copy[0] = None
            if c1 is not None:
                seconds[1] += dt
                if m1:
                    remaining[1] -= r1 * dt
                if setup_until[1] <= soon and remaining[1] <= negligible[1]:
                    done[c1.op_id] = t
                    copy[1] = None
            self.now = now = t
        return True

    def _ready(self, copy: Copy) -> bool:
        """Whether every copy `copy` is ordered after has completed."""
        for op in copy.after:
            if op not in self.done:
                return False
        return True

    def _move_to(self, t: float) -> None:
        """Move every running copy on to time t (no event in between), then finish those with nothing
        left to move."""
        now, copy, moving = self.now, self.copy, self._moving()
        rates = self.rates[moving]
        for slot in (0, 1):
            if copy[slot] is not None:
                self.seconds[slot] += t - now
                if moving >> slot & 1:
                    self.remaining[slot] -= rates[slot] * (t - now)
        self.now = t
        self._finish()

    def _finish(self) -> None:
        soon, copy = self.now + EPSILON, self.copy
        for slot in (0, 1):
            if copy[slot] is not None and self.setup_until[slot] <= soon and self.remaining[slot] <= self.negligible[slot]:
                self.done[copy[slot].op_id] = self.now
                copy[slot] = None

    def _start_ready(self) -> None:
        """Start every copy that can start now (an empty copy finishes at once and frees its stream)."""
        started = True
        while started:
            started = False
            for slot, queue in enumerate(self.queues):
                if self.copy[slot] is not None or not queue:
                    continue
                at, copy = queue[0]
                if at <= self.now + EPSILON and self._ready(copy):
                    queue.popleft()
                    self.started[copy.op_id] = self.now
                    self.copy[slot] = copy
                    self.setup_until[slot] = self.now + copy.calls * self.latency
                    self.remaining[slot] = float(copy.nbytes)
                    self.negligible[slot] = 1e-9 * max(1.0, copy.nbytes)
                    started = True
            self._finish()
