"""PipeMax's streamed requests: KV in CPU memory, brought to each GPU's staging slot only for the
micro-batch iteration that computes them, within each window's prefetch budget, chosen greedily.

Designed from the PipeMax description (arXiv 2605.02189: pipeline parallelism on a PCIe server without
NVLink, one micro-batch active per GPU, the KV of inactive micro-batches offloaded to CPU memory and
prefetched while the other stages compute, within a per-window budget, requests chosen greedily to fill
it); the paper was not available. Assumptions:
- Resident first. A request its micro-batch's engine can take keeps its KV in HBM, as in pp-vllm; one it
  cannot take (no blocks or no seat) is streamed: its KV lives in CPU memory, every stage's part, and an
  iteration that computes it brings each stage's part to that stage's GPU during the window before and
  writes the new tokens' KV back after. Offloading every inactive micro-batch would send each request's
  KV over PCIe once per generated token; on a link ~35x slower than HBM (L40S) that loses to keeping it,
  so what HBM holds stays and only the excess is streamed.
- Window and budget. When a plan is made, the group for the plan after it is chosen, and its prefetch is
  issued on each stage as that stage takes the plan: the plan's stage time is the group's window. A
  group fits when, per layer, its prefetch plus its write-back (calls x latency + bytes at the GPU's
  share of the PCIe tree when every GPU copies at once: its link, its switch's uplink / GPUs per switch,
  host memory / GPUs) take no longer than one layer of that plan, and its blocks fit a staging slot. Each
  GPU has two slots (one computing, one filling); a prefetch waits for the write-back of the group that
  used its slot before, so the budget counts both. The slot holds what a typical decode window moves
  (the slots at most half the KV pool); its tokens and sequences are reserved in the activation working
  set on top of the engine's limits. A request too big for its engine's blocks that fits a slot is
  served streamed only.
- Greedy. Streamed requests not in flight, smallest KV first (each yields one token, so the smallest
  maximise the window's tokens), are taken while they fit; once all are taken, waiting requests their
  engine cannot take (oldest first) and whose KV fits a slot all their life, prefilled in the slot and
  written back, while they fit. So the
  streamed set grows only while the windows have room for it, and each streamed request comes round
  once per pass of the pipeline, as a resident one does. With nothing else to run, the first candidate
  is taken whatever the window (progress).
- Back to HBM. A streamed request whose plan's engine has blocks and a seat for it joins that engine
  (pipeline.py): its KV, in the staging slot for the plan anyway, is copied into the engine's blocks on
  the GPU (a device copy, not priced) and stays; it is not streamed again.
- Memory. Streamed KV is bounded by the CPU pool; a streamed request that needs a block when none is free
  is preempted by recompute (back to its engine's queue). Copies carry bytes only (no slot pairs).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import count
from typing import Callable

from hwmodels import BatchShape, CostModel, HardwareSpec

from .batching import Scheduler
from .blocks import CPU, BlockTables
from .config import EngineConfig
from .pipeline_layout import StageLayout
from .plan import D2H, H2D, LAYER_KV, Copy
from .request import Request, State

SLOTS = 2  # staging slots per GPU: the group computing and the group arriving


def copy_bandwidth_share(hw: HardwareSpec, num_gpus: int) -> dict[str, float]:
    """Bytes/s each GPU's copies get per direction when every GPU of the pipeline copies at once."""
    server, link = hw.server, hw.link
    share = hw.host.bandwidth / num_gpus
    if server.switch_uplink_bandwidth and server.gpus_per_switch > 1:
        share = min(share, server.switch_uplink_bandwidth / min(server.gpus_per_switch, num_gpus))
    return {H2D: min(link.h2d_bandwidth, share), D2H: min(link.d2h_bandwidth, share)}


def slot_blocks(cost_model: CostModel, bandwidth: float, batch: int, context: int, block_size: int,
                pool_blocks: int) -> int:
    """Blocks a staging slot holds: what `bandwidth` moves while a layer decodes `batch` sequences at `context`
    (the typical window), at least one, and the slots together at most half of `pool_blocks`."""
    layer = cost_model.layer_time(BatchShape.of(decodes=[context] * batch))
    tokens = bandwidth * layer / cost_model.model.kv_bytes_per_token_layer
    return max(1, min(int(tokens // block_size), pool_blocks // (2 * SLOTS)))


def runs(slots: list[int]) -> int:
    """Copy calls for `slots`: one per run of consecutive slots."""
    return sum(1 for i, slot in enumerate(slots) if i == 0 or slot != slots[i - 1] + 1)


@dataclass
class Budget:
    """What a group may still take: staging-slot blocks, and seconds of copies per layer. With `force`, the
    first request is taken whatever its seconds."""
    blocks: int
    seconds: float
    force: bool = False
    taken: int = 0

    def take(self, blocks: int, seconds: float) -> bool:
        """Take a request with these needs if they fit."""
        if blocks > self.blocks or (seconds > self.seconds and not (self.force and self.taken == 0)):
            return False
        self.blocks, self.seconds, self.taken = self.blocks - blocks, self.seconds - seconds, self.taken + 1
        return True


@dataclass
class Group:
    """The streamed part of one plan and its copies, one of each per stage."""
    work: list[tuple[Request, int]]   # (request, tokens it computes)
    prefetch: tuple[Copy, ...]       # its cached KV into the staging slot
    writeback: tuple[Copy, ...]      # what its new tokens write, back to CPU memory


class Streamer:
    def __init__(self, config: EngineConfig, layout: StageLayout, cost_model: CostModel, cpu_blocks: int,
                 slot_capacity: int, bandwidth: dict[str, float]):
        self.config, self.layout, self.slot_capacity = config, layout, slot_capacity
        self.latency, self.bandwidth = cost_model.hw.link.transfer_latency, bandwidth
        self.tables = BlockTables(0, cpu_blocks)
        self.idle: dict[int, Request] = {}             # streamed, not in flight
        self.in_flight = 0                             # groups in flight
        self.origin: dict[int, Scheduler] = {}         # request id → its engine
        self._written: dict[int, tuple[int, ...]] = {}  # request id → its last write-back per stage
        self._slot_users: list[tuple[int, ...]] = [()] * SLOTS  # per slot, the write-backs of its last group
        self._groups, self._ids = count(), count()

    @property
    def has_work(self) -> bool:
        return bool(self.idle) or self.in_flight > 0

    def _transfer(self, request: Request, new: int) -> tuple[int, int, int, int]:
        """Per layer: (blocks fetched, their calls, blocks written back, their calls) for `request` computing
        `new` tokens. Blocks not allocated yet are written in one more call."""
        c, slots = self.config, [b.slot for b in self.tables.table(request.request_id)]
        cached, first, last = c.blocks_for(request.computed), request.computed // c.block_size, \
            c.blocks_for(request.computed + new)
        written = slots[first:last]
        return cached, runs(slots[:cached]), last - first, runs(written) + (len(written) < last - first)

    def _seconds(self, request: Request, new: int) -> float:
        """Seconds per layer its prefetch and write-back take at the GPU's share of the PCIe tree."""
        fetched, fetch_calls, written, write_calls = self._transfer(request, new)
        block = self.config.block_bytes_layer
        return ((fetch_calls + write_calls) * self.latency + fetched * block / self.bandwidth[H2D]
                + written * block / self.bandwidth[D2H])

    def streamable(self, request: Request) -> bool:
        """Whether a request's KV fits a staging slot and the CPU pool all its life."""
        blocks = self.config.blocks_for(request.max_context)
        return blocks <= self.slot_capacity and blocks <= self.tables.pools[CPU].capacity

    def select(self, window: float, newcomer: Callable, force: bool = False) -> Group | None:
        """A group within `window` seconds of copies per layer (see the module docstring);
        `newcomer(streamable)` gives the oldest waiting request no engine can take now that `streamable`
        accepts, with its engine."""
        c, cpu = self.config, self.tables.pools[CPU]
        budget, work = Budget(self.slot_capacity, window, force), []
        for request in sorted(self.idle.values(), key=lambda r: (r.computed, r.arrival_s, r.request_id)):
            need = c.blocks_for(request.computed + 1) - len(self.tables.table(request.request_id))
            if need > cpu.num_free:
                self._preempt(request)
                continue
            if not budget.take(c.blocks_for(request.computed + 1), self._seconds(request, 1)):
                break
            self.tables.append(request.request_id, CPU, need)
            del self.idle[request.request_id]
            work.append((request, 1))
        while not self.idle and (spilled := newcomer(self.streamable)) is not None:
            engine, request = spilled
            need = c.blocks_for(request.context)
            if need > cpu.num_free:
                break
            self.tables.append(request.request_id, CPU, need)
            if not budget.take(need, self._seconds(request, request.context)):
                self.tables.free(request.request_id)
                break
            engine.take_head()
            request.state = State.RUNNING
            self.origin[request.request_id] = engine
            work.append((request, request.context))
        return self._group(work) if work else None

    def _group(self, work: list[tuple[Request, int]]) -> Group:
        """The group's copies: per stage, one prefetch of every request's cached blocks into the slot (after
        the slot's previous write-back and each request's own) and one write-back of what it writes."""
        layout, slot = self.layout, next(self._groups) % SLOTS
        fetched, fetch_calls, written, write_calls = (sum(column) for column in
                                                      zip(*(self._transfer(r, new) for r, new in work)))
        prefetches, writebacks = [], []
        for stage, layers in enumerate(layout.layers):
            after = set(self._slot_users[slot][stage:stage + 1])
            after.update(self._written[r.request_id][stage] for r, _ in work if r.request_id in self._written)
            prefetches.append(Copy(next(self._ids), H2D, LAYER_KV, None, (), fetched * layout.block_bytes(stage),
                                   fetch_calls * layers, tuple(sorted(after))))
            writebacks.append(Copy(next(self._ids), D2H, LAYER_KV, None, (), written * layout.block_bytes(stage),
                                   write_calls * layers))
        self._slot_users[slot] = tuple(w.op_id for w in writebacks)
        for request, _ in work:
            self._written[request.request_id] = self._slot_users[slot]
        self.in_flight += 1
        return Group(work, tuple(prefetches), tuple(writebacks))

    def release(self, group: Group, request: Request) -> None:
        """Hand a request of `group` over to a micro-batch's engine, which keeps its KV in HBM from now on
        (copied from the staging slot on the GPU: its CPU blocks are free)."""
        group.work = [(r, new) for r, new in group.work if r is not request]
        self.tables.free(request.request_id)
        self._written.pop(request.request_id, None)
        self.origin.pop(request.request_id)

    def _preempt(self, request: Request) -> None:
        """Recompute: free its CPU blocks and send it back to the front of its engine's queue."""
        del self.idle[request.request_id]
        self.tables.free(request.request_id)
        self._written.pop(request.request_id, None)
        request.computed, request.state = 0, State.WAITING
        request.preemptions += 1
        self.origin.pop(request.request_id).requeue(request)

    def complete(self, group: Group, now: float) -> list[Request]:
        """Advance the group's requests; free and return the ones that finished."""
        self.in_flight -= 1
        finished = []
        for request, new in group.work:
            if request.advance(new, now):
                self.tables.free(request.request_id)
                self._written.pop(request.request_id)
                self.origin.pop(request.request_id)
                finished.append(request)
            else:
                self.idle[request.request_id] = request
        return finished
