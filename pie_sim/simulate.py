"""A simulated run: requests arrive (a SimPy process) while the engine loop (another) plans iterations
with the policy and executes them on the timeline, until every request has finished or been rejected."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import simpy

from hwmodels import CostModel
from pie_policy import Request, State
from pie_policy.records import RunRecorder

from .layer_events import LayerEvents
from .timeline import Timeline


class CountingEnvironment(simpy.Environment):
    """Counts the events it schedules (for the events/s figure)."""
    scheduled = 0

    def schedule(self, event, priority=simpy.core.NORMAL, delay=0):
        self.scheduled += 1
        super().schedule(event, priority, delay)


@dataclass
class SimResult:
    requests: list[Request]
    recorder: RunRecorder
    timeline: Timeline | None   # the recurrence backend, for its trace (None in per-layer mode)
    events: int                 # SimPy events processed
    wall_s: float


def workload_rows(workload: pd.DataFrame) -> list[tuple]:
    """(request_id, arrival_s, prompt_tokens, output_tokens) per request, in arrival order."""
    return list(zip(workload.request_id.tolist(), workload.arrival_s.tolist(),
                    workload.prompt_tokens.tolist(), workload.output_tokens.tolist()))


def arrivals(env: simpy.Environment, rows: list[tuple], policy, requests: list, arrived: Callable[[], object]):
    """SimPy process body: queue each request with `policy` at its arrival time, then call `arrived`;
    requests arriving together are all queued before the engine plans."""
    for request_id, arrival, prompt, output in rows:
        if arrival > env.now:
            yield env.timeout(arrival - env.now)
        requests.append(policy.add_request(request_id, arrival, prompt, output))
        arrived()


def check_all_done(name: str, requests: list[Request], rows: list[tuple]) -> None:
    """Conservation: every request of the workload arrived and finished or was rejected."""
    unfinished = [r for r in requests if r.state not in (State.FINISHED, State.REJECTED)]
    if unfinished or len(requests) != len(rows):
        raise RuntimeError(f"{name}: {len(unfinished)} requests never finished")


def simulate(policy, cost_model: CostModel, workload: pd.DataFrame, *, layer_events: bool = False,
             decode_runs: bool = True, traced_iterations: int = 0,
             on_finish: Callable[[int], None] | None = None) -> SimResult:
    """Serve `workload` (request_id, arrival_s, prompt_tokens, output_tokens) with `policy`. With
    `decode_runs` (not in `layer_events` mode), stretches of plain decode iterations are planned and
    priced together up to the next arrival: the same iterations as one by one, far fewer Python steps."""
    started = time.perf_counter()
    env = CountingEnvironment()
    backend = LayerEvents(cost_model, env) if layer_events else Timeline(cost_model, env, traced_iterations)
    recorder, requests = RunRecorder(), []
    wake = [env.event()]
    rows = workload_rows(workload)
    runs = decode_runs and not layer_events

    def engine(arriving: simpy.Process):
        while True:
            run = policy.next_run() if runs and backend.accepts_runs(env.now) else None
            if run is not None:
                upcoming = rows[len(requests)][1] if len(requests) < len(rows) else float("inf")
                start = env.now
                seconds, ends, sequences, blocks = backend.decode_run(run, start, upcoming)
                yield env.timeout(ends[-1] - start)
                finished = policy.commit_run(run, ends)
                recorder.decode_run(run, start, seconds, ends, sequences, blocks)
                if on_finish and finished:
                    on_finish(len(finished))
                continue
            plan = policy.next_iteration()
            if plan is None:
                if not arriving.is_alive:
                    if policy.has_work:
                        raise RuntimeError(f"{policy.name}: requests are waiting but none can run")
                    return
                wake[0] = env.event()
                yield wake[0] | arriving
                continue
            stats = yield from backend.iteration(plan)
            finished = policy.observe(plan, stats)
            recorder.iteration(plan, stats, policy)
            if on_finish and finished:
                on_finish(len(finished))

    arriving = env.process(arrivals(env, rows, policy, requests, lambda: wake[0].triggered or wake[0].succeed()))
    env.run(until=env.process(engine(arriving)))
    check_all_done(policy.name, requests, rows)
    return SimResult(requests, recorder, backend if isinstance(backend, Timeline) else None, env.scheduled,
                     time.perf_counter() - started)
