"""A simulated run: the serving loop (pie_serving.loop) as a SimPy process, with the simulated clock, on a
backend that prices each plan by exact recurrence (`Timeline`) or by one SimPy event per layer and copy
(`LayerEvents`, a check), until every request has finished or been rejected."""
from __future__ import annotations

import time
from copy import copy
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import simpy

from hwmodels import CostModel
from pie_policy import Plan, Request
from pie_policy.interfaces import ServingPolicy
from pie_policy.plan import DecodeRun
from pie_serving import Arrival, RunRecorder, Serving, serve

from .layer_events import LayerEvents
from .timeline import Timeline


class CountingEnvironment(simpy.Environment):
    """Tells how many events it has scheduled (for the events/s figure): SimPy numbers every event it
    schedules from a counter, read here without drawing from it (an override of `schedule` would add a
    call to every event)."""

    @property
    def scheduled(self) -> int:
        return next(copy(self._eid))


@dataclass
class SimResult:
    requests: list[Request]
    recorder: RunRecorder
    timeline: Timeline | None   # the recurrence backend, for its trace (None in per-layer mode)
    events: int                 # SimPy events processed
    wall_s: float


def workload_rows(workload: pd.DataFrame) -> list[Arrival]:
    """(request_id, arrival_s, prompt_tokens, output_tokens) per request, in arrival order."""
    return list(zip(workload.request_id.tolist(), workload.arrival_s.tolist(),
                    workload.prompt_tokens.tolist(), workload.output_tokens.tolist()))


def engine(env: simpy.Environment, serving: Serving, backend: Timeline | LayerEvents,
           accepts_runs: Callable[[bool], bool] | None):
    """SimPy process body: the serving loop's steps done in simulated time. A plan is priced from now and
    the clock moves to its end; a decode run likewise, up to the next arrival (a copying one to the clock
    its iterations reached, as one timeout when that lands on it exactly, else one per iteration, as its
    plans would have); an idle loop waits for the arrival."""
    loop = serve(serving, lambda: env.now, accepts_runs)
    reply = None
    while True:
        try:
            step = loop.send(reply)
        except StopIteration:
            return
        if isinstance(step, Plan):
            reply = backend.run(step, env.now)
            yield env.timeout(reply.end_s - env.now)
        elif isinstance(step, DecodeRun):
            assert isinstance(backend, Timeline)
            reply = backend.decode_run(step, env.now, serving.next_arrival)
            if reply.clock is None:
                yield env.timeout(reply.ends[-1] - reply.start)
            elif env.now + (reply.clock - env.now) == reply.clock:
                yield env.timeout(reply.clock - env.now)
            else:
                for end in reply.ends:
                    yield env.timeout(end - env.now)
        else:
            reply = None
            yield env.timeout(step - env.now)


def simulate(policy: ServingPolicy, cost_model: CostModel, workload: pd.DataFrame, *, layer_events: bool = False,
             decode_runs: bool = True, traced_iterations: int = 0,
             on_finish: Callable[[int], None] | None = None, token_gaps: bool = False) -> SimResult:
    """Serve `workload` (request_id, arrival_s, prompt_tokens, output_tokens) with a single-engine policy
    or FlexGen. With `decode_runs` (not in `layer_events` mode), stretches of plain decode iterations are
    planned and priced together up to the next arrival: the same iterations as one by one, far fewer
    Python steps. `token_gaps`: fold the gaps between tokens (ITL) into the recorder."""
    started = time.perf_counter()
    env = CountingEnvironment()
    serving = Serving(policy, workload_rows(workload), on_finish, token_gaps)
    if layer_events:
        backend: Timeline | LayerEvents = LayerEvents(cost_model)
        accepts_runs = None
    else:
        timeline = backend = Timeline(cost_model, traced_iterations)
        accepts_runs = (lambda copying: timeline.accepts_runs(env.now, copying)) if decode_runs else None
    env.run(until=env.process(engine(env, serving, backend, accepts_runs)))
    return SimResult(serving.close(), serving.recorder, backend if isinstance(backend, Timeline) else None,
                     env.scheduled, time.perf_counter() - started)
