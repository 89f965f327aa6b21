"""Decode runs: many plain decode iterations planned at once (the simulator's fast path).

Between arrivals an engine mostly repeats one iteration: every running sequence decodes one token. When
nothing else can happen (`Scheduler.plain_decodes`), those iterations differ only in arithmetic: contexts
grow by one, a sequence takes a new GPU block every `block_size` tokens, and finished sequences leave,
freeing their blocks. `plan` yields the iterations' batches lazily, in O(1) each plus O(1) per finish
(the simulator prices them until the next arrival); `commit` applies the first k exactly as
`Scheduler.schedule` and `complete` would one by one: the same blocks in the same order, the same
finishing iterations (tests/test_simulate.py checks it against one by one).

A run goes past a finish only while nobody waits and nobody is swapped out: freed blocks could admit a
waiting request or swap one back in.

With live KV on the CPU (layer swapping), the iterations of a run also copy, the same copies in each:
every CPU block is prefetched and every CPU block the decodes write (a sequence's last block) written
back. So a run ends before a sequence whose last block is on the CPU takes a new block (what is written
back would change) and after a sequence holding CPU blocks finishes (what is fetched would).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

from .batching import Scheduler
from .blocks import CPU, GPU
from .plan import RunStep
from .request import Request, State


@dataclass(frozen=True)
class OpenRun:
    """The batch of a planned run, as `commit` needs it (per sequence, FCFS: the order blocks go out)."""
    order: list[Request]
    phases: list[int]        # the iteration (0-based) of each one's first new block; then every block_size
    remaining: list[int]     # decodes each has left: it finishes in iteration remaining - 1


def plan(scheduler: Scheduler, copying: bool = False) -> tuple[Iterator[RunStep], OpenRun] | None:
    """The next iterations' steps as a run when they are plain decodes, with what `commit` needs; else None.
    `copying`: the run may hold live CPU blocks (the caller plans their steady copies)."""
    order = scheduler.plain_decodes(copying)
    if order is None:
        return None
    size, tables = scheduler.config.block_size, scheduler.tables
    held = [len(tables.tables[r.request_id]) for r in order]
    phases = [blocks * size - r.computed for blocks, r in zip(held, order)]
    gpu = scheduler.tables.pools[GPU]
    if min(phases) < 0 or max(phases) >= size or phases.count(0) > gpu.num_free:
        return None  # a table not sized to its context, or no block for the first iteration: one by one
    on_cpu, stop = [0] * len(order), None
    if tables.pools[CPU].num_used and scheduler.placement.live_cpu:
        on_cpu = [tables.count(r.request_id, CPU) for r in order]
        tails = [phase for phase, r in zip(phases, order) if tables.tables[r.request_id][-1].tier == CPU]
        stop = min(tails, default=None)
        if stop == 0:
            return None  # a sequence's last block on the CPU fills now: what it writes back changes
    run = OpenRun(order, phases, [r.output_tokens - r.generated for r in order])
    steps = _steps(run, [h - c for h, c in zip(held, on_cpu)], on_cpu, size, gpu.num_free, gpu.num_used,
                   until_first_finish=bool(scheduler.waiting or scheduler.swapped), stop=stop)
    return steps, run


def _steps(run: OpenRun, held: list[int], on_cpu: list[int], size: int, free: int, used: int,
           until_first_finish: bool, stop: int | None) -> Iterator[RunStep]:
    """Each next iteration's step (the first has its blocks: `plan` checked), until one lacks a GPU block,
    everyone has finished, (with a queue) after the first finish, after a finish of a rank holding CPU
    blocks (`on_cpu`; `held`: the GPU blocks of each), or at `stop` iterations."""
    cached = {rank: r.computed for rank, r in enumerate(run.order)}
    takers = [0] * size  # sequences taking a block in iterations ≡ phase (mod size)
    for phase in run.phases:
        takers[phase] += 1
    leaving = defaultdict(list)
    for rank, left in enumerate(run.remaining):
        leaving[left - 1].append(rank)
    total, longest, step = sum(cached.values()), max(cached.values()), 0
    while cached and step != stop:
        taken = takers[step % size]
        if taken > free:
            return
        free, used = free - taken, used + taken
        during, sequences = used, len(cached)
        attended, padded = total + sequences * (step + 1), sequences * (longest + step + 1)
        cpu_freed = 0
        for rank in leaving.get(step, ()):
            phase = run.phases[rank]
            blocks = held[rank] + (step - phase) // size + 1 if step >= phase else held[rank]
            free, used, total = free + blocks, used - blocks, total - cached.pop(rank)
            takers[phase] -= 1
            cpu_freed += on_cpu[rank]
        if step in leaving and cached:
            longest = max(cached.values())
        yield RunStep(sequences, attended, padded, used, during, cpu_freed)
        if cpu_freed or (until_first_finish and step in leaving):
            return
        step += 1


def commit(scheduler: Scheduler, run: OpenRun, iterations: int, ends: list[float]) -> list[Request]:
    """Apply the first `iterations` iterations of `run`, iteration j ending at ends[j]; returns the requests
    that finished. Blocks go out as `_run` hands them (iteration by iteration, FCFS within one) and come
    back as `complete` frees them (after the iteration a request finishes in)."""
    size, tables, pool = scheduler.config.block_size, scheduler.tables, scheduler.tables.pools[GPU]
    by_phase: list[list[int]] = [[] for _ in range(size)]
    for rank, phase in enumerate(run.phases):
        by_phase[phase].append(rank)
    leaving = defaultdict(list)
    for rank, left in enumerate(run.remaining):
        if left <= iterations:
            leaving[left - 1].append(rank)
    got: list[list] = [[] for _ in run.order]
    wanting: list[int] = []  # ranks owed a block, in the order `_run` asks: allocated at once before a free

    def hand_out() -> None:
        for rank, block in zip(wanting, pool.allocate(len(wanting))):
            got[rank].append(block)
        wanting.clear()

    finished = []
    for step in range(iterations):
        wanting += by_phase[step % size]
        for rank in leaving.get(step, ()):
            hand_out()
            request = run.order[rank]
            by_phase[run.phases[rank]].remove(rank)
            tables.extend(request.request_id, GPU, got[rank])
            request.decode(step + 1, ends[step])
            tables.free(request.request_id)
            finished.append(request)
    hand_out()
    last = ends[iterations - 1]
    for request, blocks in zip(run.order, got):
        if request.state is State.RUNNING:
            if blocks:
                tables.extend(request.request_id, GPU, blocks)
            request.decode(iterations, last)
    scheduler.ran(run.order)
    return finished
