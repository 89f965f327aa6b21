"""The two sides of the contract, declared: what a policy offers the serving loop and what a backend
offers it. A backend never decides and a policy never measures; plans go down and stats come back, both
plain data (plan.py). One loop drives every backend (pie_serving.loop):

    policy.add_request(...)                        # as requests arrive (times from the backend's clock)
    plan = policy.next_iteration(micro_batch)      # None when nothing can run until more requests arrive
    stats = backend.run(plan, start_s)             # simulated or real
    finished = policy.observe(plan, stats)         # the requests that completed in it

A policy that can also hand out many plain decode iterations at once (the simulator's fast path)
implements `DecodeRunPolicy`; a single-engine policy has one micro-batch (0), a pipeline policy one per
virtual engine. Which backends run a policy is stated where it is registered (registry.py).
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

from .plan import DecodeRun, IterationStats, Plan
from .request import Request


@runtime_checkable
class ServingPolicy(Protocol):
    """Every policy: requests in, plans out, stats back, KV holdings reported."""
    name: str

    @property
    def micro_batches(self) -> int:
        """Plans that may be in flight at once, one per virtual engine (1 for a single engine)."""
        ...

    def add_request(self, request_id: int, arrival_s: float, prompt_tokens: int, output_tokens: int) -> Request:
        """Queue a request; it comes back REJECTED, with the reason, when it can never run."""
        ...

    @property
    def has_work(self) -> bool:
        """Whether any request is queued or running."""
        ...

    def next_iteration(self, micro_batch: int = 0) -> Plan | None:
        """The next plan of `micro_batch` (whose previous plan has come back), or None when it has nothing
        to run until more requests arrive."""
        ...

    def observe(self, plan: Plan, stats: IterationStats) -> list[Request]:
        """Account for an executed plan; the requests that finished in it."""
        ...

    @property
    def kv_bytes(self) -> tuple[int, int]:
        """KV bytes held on the GPU(s) and in CPU memory now."""
        ...

    @property
    def cpu_share(self) -> float:
        """Share of the live KV in CPU memory now (what the run records per iteration)."""
        ...


@runtime_checkable
class DecodeRunPolicy(ServingPolicy, Protocol):
    """A policy that can plan stretches of plain decode iterations at once (see decode_runs.py)."""

    def next_run(self, accepts: Callable[[bool], bool] | None = None) -> DecodeRun | None:
        """The next iterations as one run when they are plain decodes and `accepts(copying)` (the backend
        can take a run that copies, or one that does not), else None; its steps are planned as the backend
        draws them, the requests and blocks change at `commit_run`."""
        ...

    def commit_run(self, run: DecodeRun, ends: Sequence[float]) -> list[Request]:
        """Account for the first len(ends) iterations of `run`; the requests that finished."""
        ...


@runtime_checkable
class Backend(Protocol):
    """Executes plans: in simulated time (pie_sim) or for real (pie_exec)."""

    def run(self, plan: Plan, start_s: float) -> IterationStats:
        """Execute `plan` from `start_s` on the run's clock (seconds since it began) and return what was
        measured. A simulated backend starts it there; a real one starts it when called and measures."""
        ...
