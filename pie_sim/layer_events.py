"""The same physics as `timeline.py` + `links.py`, written independently as SimPy processes with one
event per layer and per copy phase. Slower; it exists to check the recurrence on small cases.

A copy engine process per stream takes copies in issue order, waits for their `after` copies, sleeps the
per-call latency, then moves bytes at the rate `links.byte_rates` gives for the directions moving at that
moment; when the other stream starts or stops moving bytes, it is interrupted and carries on at the new
rate. The GPU process walks the layers of each plan: a layer computes for its time alone, then for what
the link's bytes moved meanwhile add to it.
"""
from __future__ import annotations

import simpy

from hwmodels import CostModel
from pie_policy import IterationStats, Plan
from pie_policy.plan import D2H, H2D, Copy

from .links import LINK, byte_rates, full_rates, setup_time, stream_of
from .timeline import head_seconds, layer_seconds


class LayerEvents:
    """A `Backend` in simulated time, as `Timeline`, built of SimPy processes in an environment of its own
    that `run` steps up to each plan's end."""

    def __init__(self, cost_model: CostModel):
        self.cm, self.hw = cost_model, cost_model.hw
        self.env = simpy.Environment()
        self.done: dict[int, simpy.Event] = {}
        self.moving: dict[str, str] = {}          # stream → direction moving bytes
        self.engines: dict[str, tuple[simpy.Store, simpy.Process]] = {}
        self.busy = dict.fromkeys(full_rates(self.hw), 0.0)
        self.link_bytes = 0.0                     # moved over the link by finished segments
        self.segments: dict[str, tuple[float, float]] = {}  # link stream → (start, rate) of its moving segment

    def _issue(self, copy: Copy) -> None:
        self.done[copy.op_id] = self.env.event()
        stream = stream_of(self.hw, copy)
        if stream not in self.engines:
            store = simpy.Store(self.env)
            self.engines[stream] = (store, self.env.process(self._engine(stream, store)))
        self.engines[stream][0].put(copy)

    def _issue_all(self, copies):
        """SimPy process body: the host issues `copies` in turn, each taking `CostModel.issue_time`."""
        for copy in copies:
            cost = self.cm.issue_time(copy.calls)
            if cost:
                yield self.env.timeout(cost)
            self._issue(copy)

    def _link_bytes_now(self) -> float:
        """Bytes moved over the link so far, the moving segments' to this instant included."""
        return self.link_bytes + sum(rate * (self.env.now - t0) for t0, rate in self.segments.values())

    def _rate_changed(self, stream: str) -> None:
        for other, (_, process) in self.engines.items():
            if other != stream and other in self.moving and process.is_alive:
                process.interrupt()

    def _engine(self, stream: str, store: simpy.Store):
        env = self.env
        while True:
            copy = yield store.get()
            yield simpy.AllOf(env, [self.done[op] for op in copy.after if op in self.done])
            began = env.now
            yield env.timeout(setup_time(self.hw, copy))
            remaining = float(copy.nbytes)
            self.moving[stream] = copy.direction
            self._rate_changed(stream)
            on_link = copy.direction in LINK
            while remaining > 1e-9 * max(1.0, copy.nbytes):
                rate = byte_rates(self.hw, set(self.moving.values()))[copy.direction]
                t0 = env.now
                if on_link:
                    self.segments[stream] = (t0, rate)
                try:
                    yield env.timeout(remaining / rate)
                    moved = remaining
                except simpy.Interrupt:
                    moved = rate * (env.now - t0)
                remaining -= moved
                if on_link:
                    self.link_bytes += moved
                    del self.segments[stream]
            del self.moving[stream]
            self._rate_changed(stream)
            self.busy[copy.direction] += env.now - began
            self.done[copy.op_id].succeed()

    def run(self, plan: Plan, start: float) -> IterationStats:
        """Run one plan from `start` (the clock only moves forward) and return its stats."""
        process = self.env.process(self._wait_then(start, plan))
        while not process.processed:
            self.env.step()
        return process.value

    def _wait_then(self, start: float, plan: Plan):
        # The caller's clock reaches the previous plan's end by a sum that may round a bit below it.
        yield self.env.timeout(max(0.0, start - self.env.now))
        return (yield from self.iteration(plan))

    def iteration(self, plan: Plan):
        """SimPy process body: run the plan from now; its value is the iteration's stats."""
        env, cm = self.env, self.cm
        start = env.now
        busy_before = dict(self.busy)
        yield from self._issue_all(plan.prologue)
        computes, stalls, alone = [], [], layer_seconds(cm, plan)
        for layer in range(cm.model.num_layers):
            step = plan.step(layer)
            yield from self._issue_all(step.issue)
            reached = env.now
            yield simpy.AllOf(env, [self.done[op] for op in step.wait])
            stalls.append(env.now - reached)
            before = self._link_bytes_now()
            yield env.timeout(alone)
            took = layer_seconds(cm, plan, (self._link_bytes_now() - before) / alone if alone > 0 else 0.0)
            computes.append(took)
            yield env.timeout(took - alone)
            yield from self._issue_all(step.evict)
        head = head_seconds(cm, plan)
        yield env.timeout(head)
        issuing = sum(cm.issue_time(copy.calls) for copy in plan.copies())
        return IterationStats.of(plan, start, env.now, sum(computes) + head + issuing, sum(stalls),
                                 self.busy[H2D] - busy_before[H2D], self.busy[D2H] - busy_before[D2H],
                                 tuple(computes), tuple(stalls))
