"""The serving loop: one for every backend, so that admission, the guards and the records are the same in
simulation and for real.

`serve` is a generator of what the backend must do next. Its driver (a SimPy process in the simulator,
`drive` in the executor) does it and sends back the result:

    a Plan        execute it from now; send back its IterationStats
    a DecodeRun   (simulator only) execute a prefix of it, up to the next arrival; send back a RunResult
    a float t     nothing can run before the next arrival, at t: let the clock reach t; send back None

Before planning, the loop queues every request whose arrival time the backend's clock has reached (in
arrival order, so requests arriving together are all queued before the plan). It ends when every request
has arrived and the policy has no work left, and raises `ServingError` when requests wait but none can
run and none will arrive. `Serving` holds the run's state and does each step; the pipeline simulator,
which keeps several plans in flight, drives those steps itself (pie_sim.pipeline_sim).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Generator, Sequence, cast

from pie_policy.interfaces import DecodeRunPolicy, ServingPolicy
from pie_policy.plan import DecodeRun, IterationStats, Plan, sampling_ids
from pie_policy.request import Request, State

from .records import RunRecorder

Arrival = tuple[int, float, int, int]  # request_id, arrival_s, prompt_tokens, output_tokens (arrival order)


class ServingError(RuntimeError):
    """The run cannot go on or did not serve its workload: a policy bug, never a user error."""


@dataclass(frozen=True)
class RunResult:
    """What a backend executed of a decode run: its start and, per iteration, its compute seconds, end,
    sequences and the GPU blocks held after it. A run that copies also has, per iteration, the record's
    other columns (`columns`: start_s, stall_s, bytes_h2d, bytes_d2h, cpu_kv_bytes, cpu_share, as
    records.ITERATION_COLUMNS names them), and `clock`, the backend's clock after it: each iteration
    started where the clock had reached, as one-by-one plans do."""
    start: float
    seconds: list[float]
    ends: list[float]
    sequences: list[int]
    blocks: list[int]
    columns: dict[str, list] | None = None
    clock: float | None = None


class Serving:
    """One run of a workload through a policy: the requests queued so far and the run's records."""

    def __init__(self, policy: ServingPolicy, arrivals: Sequence[Arrival],
                 on_finish: Callable[[int], None] | None = None, token_gaps: bool = False):
        """`token_gaps`: fold the gaps between tokens (ITL) into `recorder.gaps` (a few percent slower)."""
        self.policy, self.arrivals, self.on_finish = policy, arrivals, on_finish
        self.requests: list[Request] = []
        self._by_id: dict[int, Request] = {}
        self.recorder = RunRecorder(token_gaps)

    @property
    def next_arrival(self) -> float:
        """When the next request arrives (inf when all have)."""
        return self.arrivals[len(self.requests)][1] if len(self.requests) < len(self.arrivals) else math.inf

    def admit(self, now: float) -> bool:
        """Queue every request that has arrived by `now`; whether there was any."""
        before = len(self.requests)
        while self.next_arrival <= now:
            request = self.policy.add_request(*self.arrivals[len(self.requests)])
            self.requests.append(request)
            self._by_id[request.request_id] = request
        return len(self.requests) > before

    def observe(self, plan: Plan, stats: IterationStats) -> list[Request]:
        """An executed plan back to the policy, into the records; the requests that finished in it."""
        finished = self.policy.observe(plan, stats)
        self.recorder.iteration(plan, stats, self.policy)
        gaps = self.recorder.gaps
        if gaps is not None:
            gaps.sampled(sampling_ids(plan.seqs), stats.end_s, self._by_id)
            gaps.finished(finished)
        self._finished(finished)
        return finished

    def commit_run(self, run: DecodeRun, result: RunResult) -> list[Request]:
        """What the backend executed of a decode run, to the policy and the records (a `DecodeRunPolicy`:
        only one hands out runs)."""
        gaps = self.recorder.gaps
        generated = gaps.generated() if gaps is not None else None
        finished = cast(DecodeRunPolicy, self.policy).commit_run(run, result.ends)
        self.recorder.decode_run(run, result)
        if gaps is not None:
            assert generated is not None  # taken above whenever there are gaps
            gaps.decoded(generated, result.ends, result.sequences)
            gaps.finished(finished)
        self._finished(finished)
        return finished

    def _finished(self, finished: list[Request]) -> None:
        if self.on_finish and finished:
            self.on_finish(len(finished))

    def over(self) -> bool:
        """Called when nothing can run now and nothing is in flight: whether the run is over (every request
        has arrived and none is left). Requests left with none to come is a stuck policy."""
        if self.next_arrival < math.inf:
            return False
        if self.policy.has_work:
            raise ServingError(f"{self.policy.name}: requests are waiting but none can run")
        return True

    def close(self) -> list[Request]:
        """Conservation: every request of the workload arrived and finished or was rejected."""
        unfinished = [r for r in self.requests if r.state not in (State.FINISHED, State.REJECTED)]
        if unfinished or len(self.requests) != len(self.arrivals):
            raise ServingError(f"{self.policy.name}: {len(unfinished) + len(self.arrivals) - len(self.requests)} "
                               f"requests never finished")
        return self.requests


def serve(serving: Serving, now: Callable[[], float], accepts_runs: Callable[[bool], bool] | None = None,
          ) -> Generator[Plan | DecodeRun | float, IterationStats | RunResult | None, list[Request]]:
    """The loop (see the module docstring). `now` reads the backend's clock; `accepts_runs(copying)`, when
    given, says whether the backend can take a decode run that copies (or one that does not) now, and the
    policy is asked for one."""
    policy = serving.policy
    runs = policy if isinstance(policy, DecodeRunPolicy) else None  # else it plans one iteration at a time
    while True:
        serving.admit(now())
        run = runs.next_run(accepts_runs) if runs is not None and accepts_runs is not None else None
        if run is not None:
            result = yield run
            assert isinstance(result, RunResult)
            serving.commit_run(run, result)
            continue
        plan = policy.next_iteration()
        if plan is None:
            if serving.over():
                return serving.close()
            yield serving.next_arrival
            continue
        stats = yield plan
        assert isinstance(stats, IterationStats)
        serving.observe(plan, stats)


def drive(serving: Serving, backend, now: Callable[[], float], wait_until: Callable[[float], None]) -> list[Request]:
    """Run the loop on a backend that executes plans as it is called (`backend.run(plan, start_s)`), with
    `now` its clock and `wait_until(t)` letting it reach t: the executor, or any closed-form backend."""
    loop = serve(serving, now)
    reply = None
    while True:
        try:
            step = loop.send(reply)
        except StopIteration as done:
            return done.value
        if isinstance(step, Plan):
            reply = backend.run(step, now())
        else:
            assert not isinstance(step, DecodeRun)  # runs go only to a driver that accepts them (`accepts_runs`)
            wait_until(step)
            reply = None
