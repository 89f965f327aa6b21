"""Independent simulations over local processes, with a progress bar: the searches of `capacity` and the
grid of `reproduce` are many runs that share nothing."""
from __future__ import annotations

import os
from concurrent.futures import as_completed
from typing import Callable, Sequence, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pie_serving.processes import worker_pool

Item, Result = TypeVar("Item"), TypeVar("Result")


def default_workers() -> int:
    return os.cpu_count() or 1


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def run_parallel(work: Callable[[Item], Result], items: Sequence[Item], console: Console, label: str,
                 workers: int | None = None) -> list[Result]:
    """`work(item)` for every item, in `workers` forked processes (inline with one), results in the items'
    order; the first exception (or Ctrl-C, SIGTERM) kills the workers and propagates."""
    workers = min(workers or default_workers(), len(items)) or 1
    results: list = [None] * len(items)
    with progress_bar(console) as bar:
        task = bar.add_task(label, total=len(items))
        if workers == 1:
            for i, item in enumerate(items):
                results[i] = work(item)
                bar.advance(task)
            return results
        with worker_pool(workers) as pool:
            futures = {pool.submit(work, item): i for i, item in enumerate(items)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.advance(task)
    return results
