"""The PCIe tree of a multi-GPU server as a fluid network in SimPy, for the pipeline simulator.

A transfer is a flow over the resources it crosses, each with a capacity in bytes/s:
- its GPU's link, per direction (`link.h2d_gb_s`, `d2h_gb_s`) and both directions together
  (`bidirectional_gb_s`);
- its PCIe switch's uplink to the CPU, per direction, shared by the switch's GPUs
  (`server.switch_uplink_gb_s`, when the server has one and more than one GPU per switch);
- host memory (`host.bandwidth_gb_s`), shared by every transfer of the server.
A GPU-to-GPU transfer (pipeline activations) is staged through host memory and pipelined, as NCCL's
shared-memory transport does without peer-to-peer: one flow over the sender's device→host path and the
receiver's host→device path, crossing host memory twice (written, then read).
Rates are weighted max-min fair (progressive filling), each flow weighted by its GPU link's bandwidth in
its direction: two directions of one link moving at once then get links.py's rule, each at its bandwidth
x bidirectional / (h2d + d2h). Rates change only when a flow starts or ends, and then only for the flows
linked to it through a resource that can fill.

`Copier` adds links.py's copy-engine rules: a stream per GPU and direction (one for both when the link has
a single copy engine) runs one copy at a time in issue order, a copy starts once the copies it is `after`
have completed, and it pays `calls x transfer_latency` before its bytes move.
"""
from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import simpy

from hwmodels import HardwareSpec
from pie_policy.plan import D2H, H2D, Copy

EPSILON = 1e-12


HOST = ("host",)


@dataclass(frozen=True)
class Route:
    """What a flow crosses, worked out once per path: (resource, bytes it carries per byte of the flow), in
    the order given, with and without host memory (which counts only while it can bind), the rate the
    flow would get alone and the host bytes it moves per byte."""
    route: tuple[tuple[tuple, float], ...]
    without_host: tuple[tuple[tuple, float], ...]
    weight: float
    alone: float
    host: float

    @classmethod
    def of(cls, capacity: dict, route: list[tuple[tuple, float]], weight: float) -> "Route":
        merged = defaultdict(float)
        for resource, load in route:
            merged[resource] += load
        items = tuple(merged.items())
        return cls(items, tuple((r, load) for r, load in items if r != HOST), weight,
                   min(capacity[r] / load for r, load in items), merged[HOST])

    def resources(self, host: bool) -> tuple[tuple, ...]:
        """The resources it crosses that count: host memory among them or not."""
        return self._resources[host]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_resources", {True: tuple(r for r, _ in self.route),
                                                False: tuple(r for r, _ in self.without_host)})


@dataclass(eq=False)
class _Flow:
    remaining: float
    path: Route
    then: Callable[[], None]                 # called when the last byte has crossed
    rate: float = 0.0

    @property
    def route(self) -> tuple[tuple[tuple, float], ...]:
        return self.path.route

    @property
    def weight(self) -> float:
        return self.path.weight

    @property
    def alone(self) -> float:
        return self.path.alone


def fair_rates(capacity: dict, flows: list, ignore: tuple = ()) -> list[float]:
    """Weighted max-min fair rates of `flows` (each with `route` and `weight`) over `capacity`, leaving
    out the resources in `ignore`: every unfrozen flow runs at weight x level; the level rises until a
    resource fills, whose flows freeze."""
    return _fair_rates(capacity, [[(r, load) for r, load in f.route if r not in ignore] for f in flows],
                       [f.weight for f in flows])


def _fair_rates(capacity: dict, routes: list, weights: list[float]) -> list[float]:
    """`fair_rates` of flows given as their routes (what counts of them) and weights."""
    rates, used, level = [0.0] * len(routes), defaultdict(float), 0.0
    open_flows = set(range(len(routes)))
    while open_flows:
        growth = defaultdict(float)
        for i in open_flows:
            for resource, load in routes[i]:
                growth[resource] += load * weights[i]
        steps = {r: (capacity[r] - used[r] - g * level) / g for r, g in growth.items()}
        step = min(steps.values())
        level += max(step, 0.0)
        full = {r for r, s in steps.items() if s <= step + 1e-9 * abs(step)}
        for i in [i for i in open_flows if any(r in full for r, _ in routes[i])]:
            open_flows.remove(i)
            rates[i] = weights[i] * level
            for resource, load in routes[i]:
                used[resource] += load * rates[i]
    return rates


class Fabric:
    """Flows over the server's resources. A change re-shares only the flows it can affect: those linked
    to it through shared resources, host memory included only while the flows' rates alone could
    exceed it (otherwise it never binds)."""

    def __init__(self, env: simpy.Environment, hw: HardwareSpec, num_gpus: int):
        self.env, self.hw = env, hw
        link, server = hw.link, hw.server
        self.capacity: dict[tuple, float] = {HOST: hw.host.bandwidth}
        self.bandwidth = {H2D: link.h2d_bandwidth, D2H: link.d2h_bandwidth}
        self.per_switch = server.gpus_per_switch if server.switch_uplink_bandwidth and server.gpus_per_switch > 1 else 0
        for gpu in range(num_gpus):
            self.capacity[("bidir", gpu)] = link.bidirectional_bandwidth
            for direction in (H2D, D2H):
                self.capacity[("link", gpu, direction)] = self.bandwidth[direction]
                if self.per_switch:
                    self.capacity[("uplink", gpu // self.per_switch, direction)] = server.switch_uplink_bandwidth
        self.flows: list[_Flow] = []
        self.users: dict[tuple, dict[_Flow, None]] = defaultdict(dict)  # resource → the flows crossing it, in order
        self.host_demand = 0.0           # host bytes/s if every flow ran at its rate alone
        self._host_binds = False         # whether host memory was in the last re-share
        self._updated = 0.0
        self._alarms: list[float] = []   # times of the wake-ups set and not yet rung (a heap)
        self._routes: dict[tuple, Route] = {}

    def path(self, gpu: int, direction: str) -> list[tuple[tuple, float]]:
        """The resources a copy between `gpu` and host memory crosses."""
        path = [(("link", gpu, direction), 1.0), (("bidir", gpu), 1.0), (HOST, 1.0)]
        if self.per_switch:
            path.append((("uplink", gpu // self.per_switch, direction), 1.0))
        return path

    def move(self, nbytes: int, route: list[tuple[tuple, float]] | Route, weight: float | None,
             then: Callable[[], None]) -> None:
        """Call `then()` once `nbytes` have crossed `route` (a `Route`, or resources and loads with `weight`)."""
        if nbytes <= 0:
            then()
            return
        self._progress()
        path = route if isinstance(route, Route) else Route.of(self.capacity, route, weight)
        flow = _Flow(float(nbytes), path, then)
        self.flows.append(flow)
        users = self.users
        for resource, _ in path.route:
            users[resource][flow] = None
        self.host_demand += path.alone * path.host
        self._reshare([flow])

    def route(self, source: int, destination: int | None, direction: str = D2H) -> Route:
        """The `Route` (made once) of a copy from GPU `source` to GPU `destination` through host memory, or
        of a copy between `source` and host memory in `direction` (destination None)."""
        key = (source, destination, direction)
        made = self._routes.get(key)
        if made is None:
            if destination is None:
                made = Route.of(self.capacity, self.path(source, direction), self.bandwidth[direction])
            else:
                made = Route.of(self.capacity, self.path(source, D2H) + self.path(destination, H2D),
                                min(self.bandwidth[D2H], self.bandwidth[H2D]))
            self._routes[key] = made
        return made

    def gpu_rate(self, gpu: int) -> float:
        """Bytes/s crossing `gpu`'s link now, both directions."""
        return sum(f.rate for f in self.users[("bidir", gpu)])

    def _progress(self) -> None:
        elapsed = self.env.now - self._updated
        if elapsed > 0:
            for flow in self.flows:
                flow.remaining -= flow.rate * elapsed
        self._updated = self.env.now

    def _reshare(self, changed: list[_Flow]) -> None:
        """New rates for the flows linked to `changed` (flows just started or ended), then a wake-up."""
        binds = self.host_demand > self.capacity[HOST]
        if binds != self._host_binds:  # host memory starts or stops counting: every rate may change
            changed, self._host_binds = self.flows, binds
        users = self.users
        if len(changed) == 1 and changed is not self.flows:  # most changes touch no other flow: no search
            flow = changed[0]
            alone = [len(users[resource]) for resource in flow.path.resources(binds)]
            if not any(alone):  # it ended and left its resources empty
                self._arm()
                return
            if alone.count(1) == len(alone) and flow in users[flow.path.route[0][0]]:  # it started, by itself
                flow.rate = flow.path.alone
                self._arm()
                return
        linked, seen, frontier = {}, set(), []
        for flow in changed:
            frontier.extend(flow.path.resources(binds))
        while frontier:  # a stack: a resource already seen is skipped as it comes off
            resource = frontier.pop()
            if resource in seen:
                continue
            seen.add(resource)
            for flow in users[resource]:
                if flow not in linked:
                    linked[flow] = None
                    frontier.extend(flow.path.resources(binds))
        linked = list(linked)
        if len(linked) == 1:
            linked[0].rate = linked[0].path.alone
        elif linked:
            rates = _fair_rates(self.capacity, [f.path.route if binds else f.path.without_host for f in linked],
                                [f.path.weight for f in linked])
            for flow, rate in zip(linked, rates):
                flow.rate = rate
        self._arm()

    def _arm(self) -> None:
        """Set a wake-up at the first flow's end unless one is set by then."""
        if self.flows:
            first_end = self.env.now + max(0.0, min(f.remaining / f.rate for f in self.flows))
            if not self._alarms or self._alarms[0] > first_end + EPSILON:
                heapq.heappush(self._alarms, first_end)
                self.env.timeout(first_end - self.env.now).callbacks.append(self._ring)

    def _ring(self, _) -> None:
        """A wake-up: finish the flows that have ended (none if rates changed since it was set)."""
        heapq.heappop(self._alarms)
        self._progress()
        ended = [f for f in self.flows if f.remaining <= EPSILON * f.rate]
        if not ended:
            self._arm()
            return
        self.flows = [f for f in self.flows if f.remaining > EPSILON * f.rate]
        for flow in ended:
            for resource, _ in flow.path.route:
                del self.users[resource][flow]
            self.host_demand -= flow.path.alone * flow.path.host
        self._reshare(ended)
        for flow in ended:
            flow.then()


class Copier:
    """Copy engines over a `Fabric`; `done[op_id]` is each copy's completion event."""

    def __init__(self, env: simpy.Environment, fabric: Fabric):
        self.env, self.fabric, self.hw = env, fabric, fabric.hw
        self.done: dict[int, simpy.Event] = {}
        self.spans: dict[int, tuple[float, float]] = {}   # op id → (start, end)
        self._tail: dict[tuple, simpy.Event] = {}         # stream → its last copy's completion

    def issue(self, copy: Copy, gpu: int) -> None:
        """A KV copy between `gpu` and host memory."""
        stream = (gpu, copy.direction if self.hw.link.copy_engines >= 2 else "both")
        done = self.done[copy.op_id] = self.env.event()
        self._start(stream, [self.done[op] for op in copy.after], copy.calls, copy.nbytes,
                    self.fabric.route(gpu, None, copy.direction), done, copy.op_id)

    def send(self, nbytes: int, source: int, destination: int | None) -> simpy.Event:
        """Activations from GPU `source` to GPU `destination` through host memory (None: to the host only),
        in one call on the source's own stream; the event succeeds once they have arrived."""
        done = self.env.event()
        self._start((source, "activations"), [], 1, nbytes, self.fabric.route(source, destination), done)
        return done

    def _start(self, stream, after: list, calls: int, nbytes: int, route: Route, done: simpy.Event,
               op_id: int | None = None) -> None:
        """Start the copy once its stream's previous copy and `after` are done; `done` succeeds at its end.
        A stream's copies end in issue order, so its previous copy's end is all the stream waits for."""
        previous = self._tail.get(stream)
        self._tail[stream] = done
        waiting = [e for e in ([previous] if previous else []) + after if not e.processed]

        def begin(_=None) -> None:
            start = self.env.now

            def finish() -> None:
                if op_id is not None:
                    self.spans[op_id] = (start, self.env.now)
                done.succeed()

            def transfer(_=None) -> None:
                self.fabric.move(nbytes, route, None, finish)

            if calls:
                self.env.timeout(calls * self.hw.link.transfer_latency).callbacks.append(transfer)
            else:
                transfer()

        if not waiting:
            begin()
        elif len(waiting) == 1:
            waiting[0].callbacks.append(begin)
        else:
            simpy.AllOf(self.env, waiting).callbacks.append(begin)
