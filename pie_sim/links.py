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
- A disk (the hardware's optional `[disk]`, FlexGen's third tier) has a stream for reads into CPU memory
  and one for writes from it, each at its own bandwidth and per-call latency, independent of the link.

When the cap covers both directions at full speed (NVLink-C2C), or one stream serves both, no rate ever
changes and a copy's start and end follow from its issue: `FixedRateLinks`, O(1) a copy. Otherwise
(PCIe hosts) `FluidLinks` steps through the events. `links_for` picks.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hwmodels import HardwareSpec
from pie_policy.plan import D2H, DISK_READ, DISK_WRITE, H2D, Copy

EPSILON = 1e-15


def full_rates(hw: HardwareSpec) -> dict[str, float]:
    """Each direction's bandwidth when it moves alone: the link's two and, where there is a disk, its two."""
    link, disk = hw.link, hw.disk
    rates = {H2D: link.h2d_bandwidth, D2H: link.d2h_bandwidth}
    if disk is not None:
        rates |= {DISK_READ: disk.read_bandwidth, DISK_WRITE: disk.write_bandwidth}
    return rates


def byte_rates(hw: HardwareSpec, moving: set[str]) -> dict[str, float]:
    """Bytes/s of each direction in `moving` (the directions transferring bytes right now)."""
    full, link = full_rates(hw), hw.link
    both = H2D in moving and D2H in moving
    shared = min(1.0, link.bidirectional_bandwidth / (full[H2D] + full[D2H])) if both else 1.0
    return {d: full[d] * (shared if d in (H2D, D2H) else 1.0) for d in moving}


def link_rate(rates: dict[str, float]) -> float:
    """Bytes/s crossing the host↔GPU link: what compute's HBM contention is charged on (disk traffic
    only touches CPU memory)."""
    return rates.get(H2D, 0.0) + rates.get(D2H, 0.0)


def stream_of(hw: HardwareSpec, copy: Copy) -> str:
    if copy.direction in (DISK_READ, DISK_WRITE):
        if hw.disk is None:
            raise ValueError(f"copy {copy.op_id} moves {copy.kind} by {copy.direction}, but {hw.name} has no "
                             f"[disk] section")
        return copy.direction
    return copy.direction if hw.link.copy_engines >= 2 else "both"


def setup_time(hw: HardwareSpec, copy: Copy) -> float:
    """The copy's per-call latencies, paid before it moves a byte."""
    on_disk = copy.direction in (DISK_READ, DISK_WRITE)
    return copy.calls * (hw.disk.transfer_latency if on_disk else hw.link.transfer_latency)


@dataclass
class _Active:
    copy: Copy
    setup_until: float   # end of the per-call latency
    remaining: float     # bytes still to move


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
        self.bandwidth = full_rates(hw)
        self.busy = dict.fromkeys(self.bandwidth, 0.0)
        self.windows: dict[str, deque] = {}              # stream → (bytes start, end, direction), by time

    def issue(self, copy: Copy, at: float) -> None:
        stream = stream_of(self.hw, copy)
        start = max([at, self.free.get(stream, 0.0)] + [self.done[op] for op in copy.after])
        moving = start + setup_time(self.hw, copy)
        end = moving + copy.nbytes / self.bandwidth[copy.direction]
        self.started[copy.op_id], self.done[copy.op_id], self.free[stream] = start, end, end
        self.busy[copy.direction] += end - start
        self.windows.setdefault(stream, deque()).append((moving, end, copy.direction))

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

    def rates(self) -> dict[str, float]:
        return {w[0][2]: self.bandwidth[w[0][2]] for w in self.windows.values() if w and w[0][0] <= self.now}


class FluidLinks:
    def __init__(self, hw: HardwareSpec):
        self.hw, self.now = hw, 0.0
        self.queues: dict[str, deque[tuple[float, Copy]]] = {}
        self.active: dict[str, _Active] = {}
        self.started: dict[int, float] = {}   # op id → start time
        self.done: dict[int, float] = {}      # op id → completion time
        self.busy = dict.fromkeys(full_rates(hw), 0.0)  # seconds each direction spent on copies (setup + bytes)

    def issue(self, copy: Copy, at: float) -> None:
        if at < self.now - EPSILON:
            raise ValueError(f"copy {copy.op_id} issued at {at} before the links' clock {self.now}")
        self.queues.setdefault(stream_of(self.hw, copy), deque()).append((at, copy))

    def rates(self) -> dict[str, float]:
        """Bytes/s moving in each direction now (after `advance`)."""
        moving = {a.copy.direction for a in self.active.values() if a.setup_until <= self.now + EPSILON}
        return byte_rates(self.hw, moving)

    def idle(self, at: float) -> bool:
        """Whether every copy issued so far has completed by `at` (advancing the model to `at`)."""
        self.advance(at)
        return not self.active and not any(self.queues.values())

    def completion(self, op_id: int) -> float:
        """When copy `op_id` completes, advancing the model as far as that."""
        while op_id not in self.done:
            if not self._step(float("inf")):
                raise RuntimeError(f"copy {op_id} can never complete (not issued, or waits on one that is not)")
        return self.done[op_id]

    def advance(self, until: float) -> None:
        """Run the model to time `until` (copies issued later start no earlier than that)."""
        while self._step(until):
            pass
        if until > self.now:
            self._progress(until)
            self._start_ready()

    def _start_ready(self) -> None:
        """Start every copy that can start now (an empty copy finishes at once and frees its stream)."""
        started = True
        while started:
            started = False
            for stream, queue in self.queues.items():
                if stream in self.active or not queue:
                    continue
                at, copy = queue[0]
                if at <= self.now + EPSILON and all(op in self.done for op in copy.after):
                    queue.popleft()
                    self.started[copy.op_id] = self.now
                    self.active[stream] = _Active(copy, self.now + setup_time(self.hw, copy), float(copy.nbytes))
                    started = True
            self._finish()

    def _next_event(self) -> float:
        rates, events = self.rates(), []
        for a in self.active.values():
            moving = a.setup_until <= self.now + EPSILON
            events.append(self.now + a.remaining / rates[a.copy.direction] if moving else a.setup_until)
        events += [queue[0][0] for queue in self.queues.values() if queue and queue[0][0] > self.now + EPSILON]
        return min(events, default=float("inf"))

    def _progress(self, t: float) -> None:
        """Move every active copy on to time t (no event in between)."""
        rates = self.rates()
        for a in self.active.values():
            self.busy[a.copy.direction] += t - self.now
            if a.setup_until <= self.now + EPSILON:
                a.remaining -= rates[a.copy.direction] * (t - self.now)
        self.now = t
        self._finish()

    def _finish(self) -> None:
        for stream, a in list(self.active.items()):
            if a.setup_until <= self.now + EPSILON and a.remaining <= 1e-9 * max(1.0, a.copy.nbytes):
                self.done[a.copy.op_id] = self.now
                del self.active[stream]

    def _step(self, until: float) -> bool:
        """Move to the next event if it comes no later than `until`; False when there is none."""
        self._start_ready()
        t = self._next_event()
        if t > until or t == float("inf"):
            return False
        self._progress(t)
        return True
