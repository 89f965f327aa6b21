"""Decode runs: many plain decode iterations planned at once (the simulator's fast path).

Between arrivals an engine mostly repeats one iteration: every running sequence decodes one token. When
nothing else can happen (`Scheduler.plain_decodes`), those iterations differ only in arithmetic: contexts
grow by one, a sequence takes a new GPU block every `block_size` tokens, and finished sequences leave,
freeing their blocks. `plan` works that out in arrays for up to `horizon` iterations; `commit` applies
the first k of them exactly as `Scheduler.schedule` and `complete` would one by one: the same blocks in the
same order, the same finishing iterations (tests/test_simulate.py checks it against one by one).

A run goes past a finish only while nobody waits: freed blocks could admit a waiting request.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .batching import Scheduler
from .blocks import GPU
from .plan import DecodeRun
from .request import Request, State

HORIZON = 256  # iterations planned at most at once: the arrays stay small; a longer stretch takes several runs


@dataclass(frozen=True)
class OpenRun:
    """What `commit` needs of a planned run."""
    order: list[Request]      # the batch, FCFS (the order blocks are handed out within an iteration)
    phases: np.ndarray        # iteration of each one's first new block
    remaining: np.ndarray     # decodes each has left (it finishes in iteration remaining - 1)


def plan(scheduler: Scheduler, first_iteration: int, horizon: int = HORIZON) -> tuple[DecodeRun, OpenRun] | None:
    """The next iterations as a run when they are plain decodes, with what `commit` needs; else None."""
    order = scheduler.plain_decodes()
    if order is None:
        return None
    size, tables = scheduler.config.block_size, scheduler.tables
    held = np.array([len(tables.tables[r.request_id]) for r in order])
    cached = np.array([r.computed for r in order])
    remaining = np.array([r.output_tokens - r.generated for r in order])
    phases = held * size - cached
    if phases.min() < 0 or phases.max() >= size:
        return None  # a table not sized to its context: leave it to one-by-one planning
    last = int(remaining.min() if scheduler.waiting else min(remaining.max(), horizon))

    # Sequence i takes a block in iterations phase_i, phase_i + size, ... before it finishes.
    takes = np.maximum(0, -(-(np.minimum(remaining, last) - phases) // size))
    firsts = np.cumsum(takes) - takes
    when = np.repeat(phases, takes) + size * (np.arange(takes.sum()) - np.repeat(firsts, takes))
    taken = np.bincount(when, minlength=last)
    ends = remaining <= last  # finishing within the horizon, freeing what it holds then
    freed = np.bincount(remaining[ends] - 1, weights=(held + takes)[ends], minlength=last)[:last].astype(np.int64)
    free_before = tables.pools[GPU].num_free - (np.cumsum(taken) - taken) + (np.cumsum(freed) - freed)
    short = np.flatnonzero(taken > free_before)  # the first iteration whose blocks the GPU lacks ends the run
    last = int(short[0]) if len(short) else last
    if last == 0:
        return None

    steps = np.arange(last)
    by_end = np.argsort(remaining, kind="stable")
    gone = np.searchsorted(remaining[by_end], steps, side="right")  # sequences finished before each iteration
    sequences = len(order) - gone
    before = np.concatenate(([0], np.cumsum(cached[by_end])))
    attended = (cached.sum() - before[gone]) + sequences * (steps + 1)  # Σ (cached + 1) over the batch
    longest = np.maximum.accumulate(cached[by_end][::-1])[::-1]          # the longest among those still in
    padded = sequences * (longest[np.minimum(gone, len(order) - 1)] + steps + 1)
    gpu_blocks = tables.pools[GPU].num_used + np.cumsum(taken[:last] - freed[:last])
    run = DecodeRun(first_iteration, last, sequences, attended, padded, gpu_blocks, scheduler.config.block_bytes)
    return run, OpenRun(order, phases, remaining)


def commit(scheduler: Scheduler, run: OpenRun, iterations: int, ends: np.ndarray) -> list[Request]:
    """Apply the first `iterations` iterations of `run`, iteration j ending at ends[j]; returns the requests
    that finished. Blocks go out as `_run` hands them (iteration by iteration, FCFS within one) and come
    back as `complete` frees them (after the iteration a request finishes in)."""
    size, tables, pool = scheduler.config.block_size, scheduler.tables, scheduler.tables.pools[GPU]
    events = [(j, 0, rank) for rank, (phase, left) in enumerate(zip(run.phases.tolist(), run.remaining.tolist()))
              for j in range(phase, min(left, iterations), size)]
    events += [(left - 1, 1, rank) for rank, left in enumerate(run.remaining.tolist()) if left <= iterations]
    events.sort()
    got: list[list] = [[] for _ in run.order]
    wanting: list[int] = []

    def hand_out():
        for rank, block in zip(wanting, pool.allocate(len(wanting))):
            got[rank].append(block)
        wanting.clear()

    finished = []
    for j, leaves, rank in events:
        if not leaves:
            wanting.append(rank)
            continue
        hand_out()
        request = run.order[rank]
        tables.extend(request.request_id, GPU, got[rank])
        request.decode(j + 1, float(ends[j]))
        tables.free(request.request_id)
        finished.append(request)
    hand_out()
    for rank, request in enumerate(run.order):
        if request.state is State.RUNNING:
            tables.extend(request.request_id, GPU, got[rank])
            request.decode(iterations, float(ends[iterations - 1]))
    scheduler.running = [r for r in run.order if r.state is State.RUNNING]
    return finished
