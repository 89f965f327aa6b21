"""Runs a plan's copies asynchronously and measures them.

On CUDA each direction has its own stream; a copy first waits (on the GPU, not the host) for the copies
it is ordered after and for the compute its data depends on, and records an event when done. On the CPU
one worker thread runs the copies in issue order (the two directions share the memory bus anyway), and a
threading.Event marks each one done. Either way the host learns about completion only when the engine
waits for a copy it needs, which is where stall is measured.

What a layer-KV copy's data depends on: a prefetch into a staging slot overwrites what the last layer to
use that slot read (and wrote: its new tokens), so it waits for that layer's compute, and for the slot's
last write-back (`Copy.after`); a write-back reads what its layer wrote, so it waits for that layer's
compute. Two orderings enforce it (`ORDERINGS`):
- `stream`: a copy waits for all the compute issued before it (`wait_stream`);
- `events`: a layer-KV copy waits only for the compute event of that layer (`computed`); whole-block copies
  still wait for all compute issued before them.
In a whole-model plan the two wait for the same compute: layer swapping issues each prefetch when the
layer after the slot's last reader is reached, and each write-back right after its layer (tests/
test_exec_ordering.py checks the engine's issue order). They differ where copies are issued later than
their data is ready: a pipeline stage's copies for the next plan, issued after all its layers.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import torch

from pie_policy.plan import D2H, H2D, LAYER_KV, Copy

STREAM, EVENTS = "stream", "events"
ORDERINGS = (STREAM, EVENTS)


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

    def computed(self, layer: int, staging: int | None, done) -> None:
        """Layer `layer` has computed (reading staging slot `staging`). Nothing to record: compute on the
        CPU is synchronous, so every copy issued after it finds its data ready."""

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
    def __init__(self, device: torch.device, ordering: str = STREAM):
        """`ordering`: one of ORDERINGS (see the module docstring); it may be changed between plans."""
        if ordering not in ORDERINGS:
            raise ValueError(f"copy ordering {ordering!r}: expected one of {', '.join(ORDERINGS)}")
        self.device, self.ordering = device, ordering
        self.streams = {H2D: torch.cuda.Stream(device), D2H: torch.cuda.Stream(device)}
        self._done: dict[int, tuple[torch.cuda.Event, torch.cuda.Event]] = {}
        self._issued: list[tuple[int, str, torch.cuda.Event, torch.cuda.Event]] = []
        self._layer_done: dict[int, torch.cuda.Event] = {}  # layer → its latest compute's end
        self._slot_read: dict[int, torch.cuda.Event] = {}   # staging slot → the end of the last layer using it

    def computed(self, layer: int, staging: int | None, done: torch.cuda.Event) -> None:
        """Layer `layer`'s compute, reading staging slot `staging` (None: none), has been issued; `done` is
        an event recorded on the compute stream after it (the engine's clock mark)."""
        self._layer_done[layer] = done
        if staging is not None:
            self._slot_read[staging] = done

    def _wait_for_compute(self, copy: Copy, stream: torch.cuda.Stream) -> None:
        """Make `stream` wait for the compute `copy`'s data depends on, as `ordering` says."""
        if self.ordering == STREAM or copy.kind != LAYER_KV:
            stream.wait_stream(torch.cuda.current_stream(self.device))  # all compute issued so far
            return
        done = self._slot_read.get(copy.staging) if copy.direction == H2D else self._layer_done.get(copy.layer)
        if done is not None:  # none: no layer has used it since this copier began
            stream.wait_event(done)

    def issue(self, copy: Copy, work: Callable[[], None]) -> None:
        stream = self.streams[copy.direction]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._wait_for_compute(copy, stream)
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
