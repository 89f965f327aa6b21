"""Runs a plan's copies asynchronously and measures them.

On CUDA each direction has its own stream; a copy first waits (on the GPU, not the host) for the copies
it is ordered after and for the compute issued before it, and records an event when done. On the CPU one
worker thread runs the copies in issue order (the two directions share the memory bus anyway), and a
threading.Event marks each one done. Either way the host learns about completion only when the engine
waits for a copy it needs, which is where stall is measured.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import torch

from pie_policy.plan import D2H, H2D, Copy


class CpuCopier:
    def __init__(self):
        self._done: dict[int, threading.Event] = {}
        self._queue: queue.Queue = queue.Queue()
        self._busy = {H2D: 0.0, D2H: 0.0}
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name="pie-copy", daemon=True)
        self._worker.start()

    def issue(self, copy: Copy, work: Callable[[], None]) -> None:
        self._done[copy.op_id] = threading.Event()
        self._queue.put((copy, work))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            copy, work = item
            self.wait(copy.after)  # issued earlier in this same queue: already done, checked all the same
            start = time.perf_counter()
            try:
                work()
            except BaseException as e:  # surfaced to the engine at its next wait
                self._error = e
            with self._lock:
                self._busy[copy.direction] += time.perf_counter() - start
            self._done.pop(copy.op_id).set()

    def wait(self, op_ids) -> None:
        """Block until the copies are done."""
        for op in op_ids:
            event = self._done.get(op)
            if event is not None:  # gone from the table: already done
                event.wait()
        if self._error is not None:
            raise RuntimeError("a KV copy failed") from self._error

    def take_busy(self) -> dict[str, float]:
        """Seconds each direction spent copying since the last call."""
        with self._lock:
            busy, self._busy = self._busy, {H2D: 0.0, D2H: 0.0}
        return busy

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join()


class CudaCopier:
    def __init__(self, device: torch.device):
        self.device = device
        self.streams = {H2D: torch.cuda.Stream(device), D2H: torch.cuda.Stream(device)}
        self._done: dict[int, tuple[torch.cuda.Event, torch.cuda.Event]] = {}
        self._issued: list[tuple[int, str, torch.cuda.Event, torch.cuda.Event]] = []

    def issue(self, copy: Copy, work: Callable[[], None]) -> None:
        compute = torch.cuda.current_stream(self.device)
        stream = self.streams[copy.direction]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream.wait_stream(compute)  # data written by compute issued so far
        for op in copy.after:
            if op in self._done:  # gone from the table: already finished
                stream.wait_event(self._done[op][1])
        with torch.cuda.stream(stream):
            start.record(stream)
            work()
            end.record(stream)
        self._done[copy.op_id] = (start, end)
        self._issued.append((copy.op_id, copy.direction, start, end))

    def wait(self, op_ids) -> None:
        """Make compute wait on the GPU for the copies (the host does not block)."""
        compute = torch.cuda.current_stream(self.device)
        for op in op_ids:
            if op in self._done:
                compute.wait_event(self._done[op][1])

    def take_busy(self) -> dict[str, float]:
        """Seconds each direction spent in copies that finished since the last call (those still in
        flight are counted when they finish, so prefetches may run on into the next iteration)."""
        busy, pending = {H2D: 0.0, D2H: 0.0}, []
        for op, direction, start, end in self._issued:
            if end.query():
                busy[direction] += start.elapsed_time(end) / 1e3
                del self._done[op]
            else:
                pending.append((op, direction, start, end))
        self._issued = pending
        return busy

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
