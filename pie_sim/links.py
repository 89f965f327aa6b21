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
- The bytes crossing the link over an interval, both directions together (`moved_until`), are what the
  timeline charges a layer's HBM contention on; disk traffic only touches CPU memory and is left out.
- A disk (the hardware's optional `[disk]`, FlexGen's third tier) has a stream for reads into CPU memory
  and one for writes from it, each at its own bandwidth and per-call latency, independent of the link.

When the cap covers both directions at full speed (NVLink-C2C), or one stream serves both, no rate ever
changes and a copy's start and end follow from its issue: `FixedRateLinks`, O(1) a copy. Otherwise
(PCIe hosts) `FluidLinks` steps through the events. `links_for` picks.
"""
from __future__ import annotations

from collections import deque

from hwmodels import HardwareSpec
from pie_policy.plan import D2H, DISK_READ, DISK_WRITE, H2D, Copy

EPSILON = 1e-15
INF = float("inf")
LINK = (H2D, D2H)   # the directions that cross the host↔GPU link


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
        self.windows: dict[str, deque] = {}              # link stream → (bytes start, end, bandwidth), by time

    def issue(self, copy: Copy, at: float) -> None:
        stream = stream_of(self.hw, copy)
        start = max(at, self.free.get(stream, 0.0), *[self.done[op] for op in copy.after])
        moving = start + setup_time(self.hw, copy)
        bandwidth = self.bandwidth[copy.direction]
        end = moving + copy.nbytes / bandwidth
        self.started[copy.op_id], self.done[copy.op_id], self.free[stream] = start, end, end
        self.busy[copy.direction] += end - start
        if copy.direction not in LINK:   # disk traffic does not cross the link: `moved_until` leaves it out
            return
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

    def moved_until(self, until: float) -> float:
        """Bytes the link moves from the clock (the last `advance`) to `until`, both directions together;
        advances to `until`."""
        moved, now = 0.0, self.now
        for window in self.windows.values():
            for moving, end, bandwidth in window:
                if moving >= until:
                    break
                moved += bandwidth * (min(end, until) - max(moving, now))
        self.advance(until)
        return moved


class FluidLinks:
    """The event-stepped model, for links with a stream per direction (`links_for` gives it no other):
    each stream is one fixed slot (the copy it runs, when that copy's latency ends, the bytes it has left),
    the link's two first, then the disk's read and write where there is a disk. The link's rates in its
    three moving states are worked out once (a disk stream's never changes), because the step loop runs a
    few times per layer of every iteration that copies. A step is the rules' arithmetic, in the same order
    as the plain model in tests/test_links.py, so that both give the same times bit for bit. The step loop
    is written out in plain loops over the slots that have anything to do (a stream with no copy and an
    empty queue takes no part in a step); a queued copy is (issue time, op id, the ops it is after,
    bytes, per-call latencies), as `enqueue` takes it."""

    def __init__(self, hw: HardwareSpec):
        if hw.link.copy_engines < 2:
            raise ValueError(f"{hw.name}: FluidLinks needs a stream per direction (copy_engines >= 2)")
        self.hw, self.now = hw, 0.0
        self.directions = tuple(full_rates(hw))   # slot order: H2D, D2H, then the disk's read and write
        self.slots = range(len(self.directions))
        self.link_slots = range(len(LINK))
        self.disk_slots = self.slots[len(LINK):]
        self.slot_of = dict(zip(self.directions, self.slots))
        self.queues = tuple(deque() for _ in self.slots)  # per slot: queued copies not started, in order
        self.copy: list[int | None] = [None] * len(self.slots)  # per slot: the id of the copy running, or None
        self.setup_until = [0.0] * len(self.slots)   # per slot: when the running copy's per-call latency ends
        self.remaining = [0.0] * len(self.slots)     # per slot: bytes it still has to move
        self.negligible = [0.0] * len(self.slots)    # per slot: remaining bytes that count as none (rounding)
        self.started: dict[int, float] = {}          # op id → start time
        self.done: dict[int, float] = {}             # op id → completion time
        self.seconds = [0.0] * len(self.slots)       # per slot: seconds spent on copies (setup + bytes)
        self.link_bytes = 0.0                        # bytes moved over the link so far, both directions
        # Indexed by which link slots move bytes (bit 0: H2D, bit 1: D2H): each slot's rate (a disk slot's
        # whether or not it moves).
        link_sets = ((), (H2D,), (D2H,), (H2D, D2H))
        self.rates = tuple(tuple(byte_rates(hw, {*m, *self.directions[2:]}).get(d, 0.0) for d in self.directions)
                           for m in link_sets)

    @property
    def busy(self) -> dict[str, float]:
        """Seconds each direction has spent on copies (setup + bytes)."""
        return dict(zip(self.directions, self.seconds))

    def issue(self, copy: Copy, at: float) -> None:
        self.enqueue(self.slot_of[stream_of(self.hw, copy)], at, copy.op_id, copy.after, copy.nbytes,
                     setup_time(self.hw, copy))

    def enqueue(self, slot: int, at: float, op_id: int, after: tuple[int, ...], nbytes: int, setup: float) -> None:
        """Queue a copy on `slot` (`issue` without a `Copy`): `setup` is its per-call latencies."""
        if at < self.now - EPSILON:
            raise ValueError(f"copy {op_id} issued at {at} before the links' clock {self.now}")
        self.queues[slot].append((at, op_id, after, nbytes, setup))

    def moved_until(self, until: float) -> float:
        """Bytes the link moves from the clock (the last `advance`) to `until`, both directions together;
        advances to `until`."""
        before = self.link_bytes
        self.advance(until)
        return self.link_bytes - before

    def idle(self, at: float) -> bool:
        """Whether every copy issued so far has completed by `at` (advancing the model to `at`)."""
        self.advance(at)
        return all(copy is None for copy in self.copy) and not any(self.queues)

    def completion(self, op_id: int) -> float:
        """When copy `op_id` completes, advancing the model as far as that."""
        done = self.done.get(op_id)
        if done is not None:
            return done
        if not self._steps(INF, op_id):
            raise RuntimeError(f"copy {op_id} can never complete (not issued, or waits on one that is not)")
        return self.done[op_id]

    def advance(self, until: float) -> None:
        """Run the model to time `until` (copies issued later start no earlier than that). With no copy
        queued, nothing can start at `until` (and what `_move_to` leaves has something left to move)."""
        slots = self._active()
        self._steps(until, None, slots)
        if until > self.now:
            self._move_to(until, slots)
            queues = self.queues
            for s in slots:
                if queues[s]:
                    self._start_ready(slots)
                    break

    def _active(self) -> range:
        """The slots that may take part in a step: the link's, and the disk's when they have work."""
        copy, queues = self.copy, self.queues
        for s in self.disk_slots:
            if copy[s] is not None or queues[s]:
                return self.slots
        return self.link_slots

    def _moving(self) -> int:
        """Which link slots move bytes now: bit 0 H2D, bit 1 D2H."""
        soon, copy, setup_until = self.now + EPSILON, self.copy, self.setup_until
        return ((copy[0] is not None and setup_until[0] <= soon)
                | (copy[1] is not None and setup_until[1] <= soon) << 1)

    def _steps(self, until: float, op_id: int | None = None, slots: range | None = None) -> bool:
        """Step from event to event up to `until` (or until copy `op_id` completes); returns whether `op_id`
        has completed. The hot loop (a few steps per layer of every iteration that copies): plain loops,
        each step's events, moves and finishes written out. `slots`: the active ones (`_active`)."""
        done, copy, queues, setup_until, remaining = self.done, self.copy, self.queues, self.setup_until, self.remaining
        negligible, seconds, all_rates = self.negligible, self.seconds, self.rates
        slots = self._active() if slots is None else slots
        while op_id not in done:
            now = self.now
            soon = now + EPSILON
            for s in slots:
                queue = queues[s]
                if copy[s] is None and queue and queue[0][0] <= soon and all(op in done for op in queue[0][2]):
                    self._start_ready(slots)
                    break
            rates = all_rates[(copy[0] is not None and setup_until[0] <= soon)
                              | (copy[1] is not None and setup_until[1] <= soon) << 1]
            t = INF
            for s in slots:
                queue = queues[s]
                if copy[s] is not None:
                    if setup_until[s] > soon:
                        event = setup_until[s]
                    else:
                        event = now + remaining[s] / rates[s]
                        if event == now:   # what is left takes less than the clock resolves: nothing
                            remaining[s] = 0.0
                elif queue:
                    event = INF
                else:
                    continue
                if queue and soon < queue[0][0] < event:
                    event = queue[0][0]
                if event < t:
                    t = event
            if t > until or t == INF:
                return op_id in done
            elapsed = t - now
            for s in slots:
                running = copy[s]
                if running is None:
                    continue
                seconds[s] += elapsed
                if setup_until[s] <= soon:
                    remaining[s] -= rates[s] * elapsed
                    if s < 2:
                        self.link_bytes += rates[s] * elapsed
                if setup_until[s] <= t + EPSILON and remaining[s] <= negligible[s]:
                    done[running] = t
                    copy[s] = None
            self.now = t
        return True

    def _move_to(self, t: float, slots: range) -> None:
        """Move every running copy of `slots` (the active ones) on to time t (no event in between), finishing
        those with nothing left."""
        now = self.now
        soon, rates = now + EPSILON, self.rates[self._moving()]
        copy, setup_until, remaining, elapsed = self.copy, self.setup_until, self.remaining, t - now
        for s in slots:
            running = copy[s]
            if running is None:
                continue
            self.seconds[s] += elapsed
            if setup_until[s] <= soon:
                remaining[s] -= rates[s] * elapsed
                if s < 2:
                    self.link_bytes += rates[s] * elapsed
            if setup_until[s] <= t + EPSILON and remaining[s] <= self.negligible[s]:
                self.done[running] = t
                copy[s] = None
        self.now = t

    def _finish(self, slots: range) -> bool:
        """Finish every copy of `slots` with nothing left to move; whether there was one."""
        soon, copy, finished = self.now + EPSILON, self.copy, False
        for slot in slots:
            if copy[slot] is not None and self.setup_until[slot] <= soon and self.remaining[slot] <= self.negligible[slot]:
                self.done[copy[slot]] = self.now
                copy[slot] = None
                finished = True
        return finished

    def _start_ready(self, slots: range) -> None:
        """Start every copy of `slots` (the active ones) that can start now. Only a copy finishing can let
        another start (it frees its stream, or completes what that one is `after`), and an empty one
        finishes at once: so go round again while copies finish."""
        now, soon, copy, queues, done = self.now, self.now + EPSILON, self.copy, self.queues, self.done
        while True:
            for slot in slots:
                queue = queues[slot]
                if queue and copy[slot] is None and queue[0][0] <= soon and all(op in done for op in queue[0][2]):
                    _, op_id, _, nbytes, setup = queue.popleft()
                    self.started[op_id] = now
                    copy[slot] = op_id
                    self.setup_until[slot] = now + setup
                    self.remaining[slot] = float(nbytes)
                    self.negligible[slot] = 1e-9 * max(1.0, nbytes)
            if not self._finish(slots):
                return
