"""One iteration of a plan in simulated time, layer by layer, by exact recurrence over the copy engines.

Layer l is reached when layer l-1 ends (layer 0 at the iteration's start, when the prologue is issued);
its `issue` copies are issued then; it starts once its `wait` copies are complete (the difference is its
stall); it computes for `CostModel.layer_time` of the batch (of each of FlexGen's GPU batches in turn),
with the bytes/s the copies move over the link meanwhile charged against HBM (the link's
`compute_contention`, or a profile's measured slow-down): the bytes they move during the layer's time
alone, over that time, so that a copy moving through a tenth of a layer slows a tenth of it; its
`evict` copies are issued when it ends. The LM head follows the last layer.
Copies still in flight carry on into the next iteration. Issuing a copy takes `CostModel.issue_time` of
the compute clock (a calibrated host cost; zero on the roofline): the copy starts when it has been
issued, and the layers after it start that much later.

In a run this is one SimPy event per iteration (simulate.py), however many layers and copies it has,
and one per decode run (`decode_run`: plain decode iterations, priced in one pass). A plan whose copies
are a layer-swap record is priced from the record (swap_recurrence.py): the same arithmetic without a
`Copy` per layer.
"""
from __future__ import annotations

from typing import Callable

from hwmodels import CostModel
from pie_policy import IterationStats, Plan
from pie_policy.plan import D2H, H2D, DecodeRun
from pie_serving import RunResult

from .links import FixedRateLinks, links_for
from .swap_recurrence import SwapMemory, price_fixed, price_fluid


def layer_seconds(cm: CostModel, plan: Plan, copy_bandwidth: float = 0.0) -> float:
    """One layer of the plan: its batches one after another, copies at `copy_bandwidth` bytes/s in flight."""
    if not plan.gpu_batches:  # the common case, kept to one call: this runs for every layer simulated
        return cm.layer_time(plan.shape, copy_bandwidth=copy_bandwidth)
    return sum(cm.layer_time(batch, copy_bandwidth=copy_bandwidth) for batch in plan.batches())


def layer_prices(cm: CostModel, plan: Plan) -> tuple[float, Callable[[float], float]]:
    """(a layer's seconds with no copy in flight, its seconds as a function of the bytes/s the link moves
    meanwhile): each price worked out once per value (the layers of a plan see a few)."""
    alone = layer_seconds(cm, plan)
    prices = {0.0: alone}

    def price(bandwidth: float) -> float:
        took = prices.get(bandwidth)
        if took is None:
            took = prices[bandwidth] = layer_seconds(cm, plan, bandwidth)
        return took
    return alone, price


def head_seconds(cm: CostModel, plan: Plan) -> float:
    return sum(cm.head_time(batch) for batch in plan.batches())


class Timeline:
    """A `Backend` in simulated time: prices each plan from its start on the cost model, keeping the copy
    engines' state (links.py) from one plan to the next, and the first iterations for the trace."""

    def __init__(self, cost_model: CostModel, traced_iterations: int = 0):
        self.cost_model, self.links = cost_model, links_for(cost_model.hw)
        self.traced_iterations = traced_iterations
        # The first `traced_iterations` iterations, and the first as many that move data: the trace shows the
        # latter when there are any. computes: (iteration, layer, start, seconds); copies: (iteration, Copy).
        self.trace = {"any": ([], []), "copying": ([], [])}
        self._counted = {"any": 0, "copying": 0}
        self._swap_memory = SwapMemory()

    def accepts_runs(self, at: float, copying: bool = False) -> bool:
        """Decode runs need the trace filled and, unless they copy (and are priced from their records), the
        links idle: no copy in flight to slow their compute. Asking moves stepped links on to `at`, as it
        does before every plan."""
        if self._counted["any"] < self.traced_iterations:
            return False
        idle = self.links.idle(at)
        return self._counted["copying"] >= self.traced_iterations if copying else idle

    def decode_run(self, run: DecodeRun, start: float, before: float) -> RunResult:
        """The iterations of `run` that start before `before` (the next arrival; at least the first), from
        `start`. Without copies each takes `CostModel.iteration_time` of its batch, stall-free (with CPU
        blocks held throughout, swapped-out sequences'); with copies,
        each is priced from its layer-swap record as its plan would be. The policy's controller, if any, is
        told each iteration's stats as it is priced, and may end the run."""
        if run.copies:
            return self._copying_run(run, start, before)
        seconds, ends, sequences, blocks = [], [], [], []
        end, price, observe = start, self.cost_model.decode_time, run.observe
        for step in run.steps:
            if ends and end >= before:
                break
            batch, attended, padded, held = step[:4]  # RunStep's first fields (indexing is the fast read)
            took = price(batch, attended, padded)
            began, end = end, end + took
            seconds.append(took)
            ends.append(end)
            sequences.append(batch)
            blocks.append(held)
            if observe is not None and not observe(
                    IterationStats(run.first_iteration + len(ends) - 1, began, end, took, 0.0, 0, 0, 0.0, 0.0), step):
                break
        self.links.advance(end)
        swapped = {"cpu_kv_bytes": [run.cpu_blocks * run.block_bytes] * len(ends)} if run.cpu_blocks else None
        return RunResult(start, seconds, ends, sequences, blocks, swapped)

    def _copying_run(self, run: DecodeRun, start: float, before: float) -> RunResult:
        """A run whose iterations copy: each priced from its record as `run` prices its plan (the clock
        moving from one iteration's start to its end as SimPy moves it between plans), drawn only once
        the one before has ended before `before`."""
        cm, links = self.cost_model, self.links
        recurrence = price_fixed if isinstance(links, FixedRateLinks) else price_fluid
        seconds, ends, sequences, blocks = [], [], [], []
        columns = {name: [] for name in ("start_s", "stall_s", "bytes_h2d", "bytes_d2h", "cpu_kv_bytes", "cpu_share")}
        now = start
        for step in run.steps:
            n = step.sequences
            plan = Plan(run.first_iteration + len(ends), (), step.shape)
            stats = recurrence(links, cm, plan, step.swap, now, *layer_prices(cm, plan), head_seconds(cm, plan),
                               self._swap_memory)
            for name, value in zip(columns, (now, stats.stall_s, stats.bytes_h2d, stats.bytes_d2h,
                                             (run.cpu_blocks - step.cpu_freed) * run.block_bytes, step.cpu_share)):
                columns[name].append(value)
            seconds.append(stats.compute_s)
            ends.append(stats.end_s)
            sequences.append(n)
            blocks.append(step.gpu_blocks)
            now += stats.end_s - now
            if (run.observe is not None and not run.observe(stats, step)) or now >= before:
                break
        return RunResult(start, seconds, ends, sequences, blocks, columns, now)

    def _issue(self, copies, t: float) -> float:
        """Issue `copies` one after another from `t`, each when the host has issued it; returns when it is done."""
        for copy in copies:
            t += self.cost_model.issue_time(copy.calls)
            self.links.issue(copy, t)
        return t

    def run(self, plan: Plan, start: float) -> IterationStats:
        """Price `plan` from `start` (not before the previous plan's start: the links only move forward)."""
        cm, links = self.cost_model, self.links
        if not (plan.prologue or plan.layers) and self.accepts_runs(start):
            took, head = layer_seconds(cm, plan), head_seconds(cm, plan)  # every layer alike, no copy
            seconds, layers = cm.model.num_layers * took + head, cm.model.num_layers
            return IterationStats.of(plan, start, start + seconds, seconds, 0.0,
                                     layer_compute_s=(took,) * layers, layer_stall_s=(0.0,) * layers)
        swap = plan.swap
        if (swap is not None and len(plan.prologue) == len(swap.prologue)
                and min(self._counted.values()) >= self.traced_iterations):  # past the traced iterations
            recurrence = price_fixed if isinstance(links, FixedRateLinks) else price_fluid
            return recurrence(links, cm, plan, swap, start, *layer_prices(cm, plan), head_seconds(cm, plan),
                              self._swap_memory)
        copies = list(plan.copies())
        traced = [kind for kind in (("any", "copying") if copies else ("any",))
                  if self._counted[kind] < self.traced_iterations]
        for kind in traced:
            self._counted[kind] += 1
        busy_before = dict(links.busy)
        t, computes, stalls = self._issue(plan.prologue, start), [], []
        alone, price = layer_prices(cm, plan)  # the batches are the same in every layer
        for layer in range(cm.model.num_layers):
            step = plan.step(layer)
            t = self._issue(step.issue, t)
            begin = t
            for op in step.wait:
                begin = max(begin, links.completion(op))
            links.advance(begin)
            bandwidth = links.moved_until(begin + alone) / alone if alone > 0 else 0.0
            took = price(bandwidth)
            stalls.append(begin - t)
            computes.append(took)
            for kind in traced:
                self.trace[kind][0].append((plan.iteration, layer, begin, took))
            t = self._issue(step.evict, begin + took)
        head = head_seconds(cm, plan)
        links.advance(t + head)  # link busy time is counted up to the end of the iteration it falls in
        for kind in traced:
            self.trace[kind][1].extend((plan.iteration, c) for c in copies)
        issuing = sum(cm.issue_time(copy.calls) for copy in copies)
        return IterationStats.of(plan, start, t + head, sum(computes) + head + issuing, sum(stalls),
                                 links.busy[H2D] - busy_before[H2D], links.busy[D2H] - busy_before[D2H],
                                 tuple(computes), tuple(stalls))
