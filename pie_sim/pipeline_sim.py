"""A simulated run of a pipeline-parallel policy (pp-vllm, pipemax) on a multi-GPU server, in SimPy.

Processes: arrivals and a driver that plans micro-batch iterations, both doing the serving loop's steps
(pie_serving.loop: several plans are in flight here, one per micro-batch at most); the stages (one
per GPU) and the copies over the server's PCIe tree (fabric.py) run on SimPy timeouts and events. Rules:
- A plan is made when its micro-batch's previous one has come back and the first stage has taken every
  plan made before (one ahead of it). A micro-batch with nothing to run waits for an arrival or for any
  plan to come back.
- Stage s takes plans in order, each once its activations from stage s-1 have arrived (stage 0: once it
  is made); it waits for the plan's `wait` copies on its GPU (the stall), computes its layers for
  `stage_time` (HBM slowed by the bytes/s its GPU's link moves as it starts), issues its `evict` copies
  and sends the activations to stage s+1: tokens x hidden size x dtype, two tensors for Llama (hidden
  states and residual, as vLLM's intermediate tensors), one for OPT. The last stage computes the LM head
  and sends the sampled token ids (8 bytes each) to the host: the plan has come back.
- Stage s issues the plan's `issue` copies on its GPU as it takes the plan (PipeMax: the prefetch of the
  next plan's streamed group), waits for its `wait` copies, and issues its `evict` copies once computed.
The input token ids' copy to the first GPU is left out (a few bytes). Rows are recorded as the single-GPU
simulator records them (RunRecorder): one per plan, from the first stage taking it to its tokens coming
back, so rows of different micro-batches overlap; compute and stall are summed over the stages.
"""
from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable

import pandas as pd
import simpy

from hwmodels import CostModel
from pie_policy import IterationStats, Plan
from pie_policy.pipeline import PipelinePolicy
from pie_policy.pipeline_layout import stage_time
from pie_policy.plan import D2H, H2D
from pie_serving import Serving

from .fabric import Copier, Fabric
from .simulate import CountingEnvironment, SimResult, workload_rows

TOKEN_ID_BYTES = 8


def activation_bytes(cost_model: CostModel, plan: Plan) -> int:
    """What a stage sends the next for a plan: vLLM's intermediate tensors, per token the hidden states
    (and, for Llama, the residual)."""
    m = cost_model.model
    return plan.shape.tokens * m.hidden_size * m.dtype_bytes * (2 if m.family == "llama" else 1)


class _Run:
    """The state the driver and the stages share."""

    def __init__(self, policy: PipelinePolicy, cost_model: CostModel, env: simpy.Environment):
        self.policy, self.cost_model, self.env = policy, cost_model, env
        self.fabric = Fabric(env, cost_model.hw, policy.layout.num_stages)
        self.copier = Copier(env, self.fabric)
        self.stages = [_Stage(self, s) for s in range(policy.layout.num_stages)]
        self.ready = deque(range(policy.micro_batches))  # micro-batches that may plan, in the order they came back
        self.idle: list[int] = []                        # micro-batches that had nothing to run
        self.made, self.in_flight = 0, 0
        self.times: dict[int, list[float]] = {}          # plan → [start, compute, stall]
        self.wake = env.event()
        self.came_back: Callable[[Plan], None] = lambda plan: None

    def notify(self) -> None:
        if not self.wake.triggered:
            self.wake.succeed()

    def wake_idle(self) -> None:
        self.ready.extend(self.idle)
        self.idle.clear()
        self.notify()

    def start(self, plan: Plan) -> None:
        """Send a plan just made to the first stage."""
        self.made += 1
        self.in_flight += 1
        self.stages[0].arrive(plan)


class _Stage:
    """One GPU: takes plans in order, each once it has arrived and the one before has been computed."""

    def __init__(self, run: _Run, index: int):
        self.run, self.index, self.env = run, index, run.env
        self.last = index == run.policy.layout.num_stages - 1
        self.queue: deque[Plan] = deque()
        self.busy, self.taken = False, -1

    def arrive(self, plan: Plan) -> None:
        self.queue.append(plan)
        if not self.busy:
            self._take()

    def _take(self) -> None:
        run, plan = self.run, self.queue.popleft()
        self.busy, self.taken = True, plan.iteration
        if self.index == 0:
            run.times[plan.iteration] = [self.env.now, 0.0, 0.0]
            run.notify()
        step = plan.step(self.index)
        for copy in step.issue:
            run.copier.issue(copy, self.index)
        reached = self.env.now
        waiting = [e for e in (run.copier.done[op] for op in step.wait) if not e.processed]
        if not waiting:
            self._compute(plan, reached)
        else:
            (waiting[0] if len(waiting) == 1 else simpy.AllOf(self.env, waiting)).callbacks.append(
                lambda _: self._compute(plan, reached))

    def _compute(self, plan: Plan, reached: float) -> None:
        run = self.run
        took = stage_time(run.cost_model, run.policy.layout, self.index, plan.shape, run.fabric.gpu_rate(self.index))
        times = run.times[plan.iteration]
        times[1] += took
        times[2] += self.env.now - reached
        self.env.timeout(took).callbacks.append(lambda _: self._computed(plan))

    def _computed(self, plan: Plan) -> None:
        run = self.run
        for copy in plan.step(self.index).evict:
            run.copier.issue(copy, self.index)
        if self.last:
            sent = run.copier.send(TOKEN_ID_BYTES * plan.shape.sampled_tokens, self.index, None)
            sent.callbacks.append(lambda _: run.came_back(plan))
        else:
            sent = run.copier.send(activation_bytes(run.cost_model, plan), self.index, self.index + 1)
            sent.callbacks.append(lambda _: run.stages[self.index + 1].arrive(plan))
        self.busy = False
        if self.queue:
            self._take()


def simulate_pipeline(policy: PipelinePolicy, cost_model: CostModel, workload: pd.DataFrame, *,
                      on_finish: Callable[[int], None] | None = None, token_gaps: bool = False) -> SimResult:
    """Serve `workload` with a pipeline policy over every GPU of `cost_model`'s server (`token_gaps`: fold
    the gaps between tokens into the recorder)."""
    started = time.perf_counter()
    env = CountingEnvironment()
    run, serving = _Run(policy, cost_model, env), Serving(policy, workload_rows(workload), on_finish, token_gaps)

    def arrivals():
        """Queue each request at its arrival time (all those arriving together at once), then wake the
        micro-batches that had nothing to run."""
        while (upcoming := serving.next_arrival) < math.inf:
            if upcoming > env.now:
                yield env.timeout(upcoming - env.now)
            serving.admit(max(env.now, upcoming))
            run.wake_idle()

    def driver(arriving: simpy.Process):
        while True:
            if run.made - 1 > run.stages[0].taken or not run.ready:
                if not run.ready and not run.in_flight and serving.over():
                    return
                run.wake = env.event()
                yield run.wake | arriving if arriving.is_alive else run.wake
                continue
            micro_batch = run.ready.popleft()
            plan = policy.next_iteration(micro_batch)
            if plan is None:
                run.idle.append(micro_batch)
            else:
                run.start(plan)

    def came_back(plan: Plan) -> None:
        start, compute, stall = run.times.pop(plan.iteration)
        busy = {H2D: 0.0, D2H: 0.0}
        for copy in plan.copies():
            if copy.op_id in run.copier.spans:  # a write-back still in flight is not counted
                begin, end = run.copier.spans[copy.op_id]
                busy[copy.direction] += end - begin
        serving.observe(plan, IterationStats.of(plan, start, env.now, compute, stall, busy[H2D], busy[D2H]))
        run.in_flight -= 1
        run.ready.append(plan.micro_batch)
        run.wake_idle()

    run.came_back = came_back
    arriving = env.process(arrivals())
    env.run(until=env.process(driver(arriving)))
    return SimResult(serving.close(), serving.recorder, None, env.scheduled, time.perf_counter() - started)
