"""Continuous batching with vLLM's (V0) semantics, over any block placement.

Each iteration:
1. Running sequences, first come first served, get their next step (a decode, or a prefill chunk with
   chunked prefill) and a block for it; when none is left the latest-arrived running sequence is
   preempted — by recompute (its blocks freed, back to the front of the waiting queue, generated tokens
   kept) or, with `swap_preemption`, by moving its blocks to CPU swap space.
2. If nobody was preempted, swapped sequences come back, oldest first, while the GPU has room.
3. Waiting sequences are admitted first come first served while the token budget, the sequence limit
   and the blocks (keeping `watermark` of the GPU free) allow; the first that does not fit stops
   admission. Without chunked prefill, admitted prefills run alone (a prefill-only iteration, as vLLM
   does), ahead of the running decodes; with it, prefills fill what the decodes left of the budget.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from operator import attrgetter

from .blocks import CPU, GPU, BlockTables
from .config import EngineConfig
from .placement import GpuOnly
from .request import Request, State

FCFS = attrgetter("arrival_s", "request_id")  # the order running sequences get their steps in


@dataclass
class Schedule:
    work: list[tuple[Request, int]] = field(default_factory=list)   # (request, tokens to compute)
    swap_out: list[tuple[int, int]] = field(default_factory=list)   # (GPU slot, CPU slot)
    swap_in: list[tuple[int, int]] = field(default_factory=list)    # (CPU slot, GPU slot)
    preempted: list[Request] = field(default_factory=list)
    limited: bool = False  # a block the controller's share refused (admission or preemption) would have fitted the CPU
    refused: list[int] = field(default_factory=list)  # tokens of KV lost by the preemptions the share caused


class Scheduler:
    """One engine's continuous batching: owns its queues (waiting, running, swapped, changed only through
    its methods) and asks its placement where each new block goes; the block tables it shares with the
    policy hold the blocks themselves."""

    def __init__(self, config: EngineConfig, tables: BlockTables, placement: GpuOnly, swap_preemption: bool):
        self.config, self.tables, self.placement = config, tables, placement
        self.swap_preemption = swap_preemption
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self._in_order = True  # whether `running` is in FCFS order (it is after `_run`, until one joins out of it)

    def refusal(self, max_context: int) -> str:
        """Why a request holding up to `max_context` tokens of KV could never run ("" if it can)."""
        c = self.config
        if max_context > c.max_model_len:
            return f"needs {max_context} tokens of context; the limit is {c.max_model_len}"
        if c.blocks_for(max_context) > self.placement.guaranteed - c.watermark_blocks:
            return (f"needs {c.blocks_for(max_context)} KV blocks; at most "
                    f"{self.placement.guaranteed - c.watermark_blocks} can ever be free for it")
        return ""

    def add(self, request: Request) -> bool:
        """Queue a request, or mark it REJECTED with the reason when it can never run."""
        request.reason = self.refusal(request.max_context)
        if request.reason:
            request.state = State.REJECTED
            return False
        self.waiting.append(request)
        return True

    def enqueue(self, request: Request) -> None:
        """Queue a request without asking whether its KV could ever fit this engine (PipeMax streams one
        that cannot; see pipeline.py)."""
        self.waiting.append(request)

    def requeue(self, request: Request) -> None:
        """Put a request preempted elsewhere back at the front of the queue."""
        self.waiting.appendleft(request)

    def take_head(self) -> Request:
        """Remove and return the head of the queue (PipeMax streams it instead; it stays this engine's)."""
        return self.waiting.popleft()

    def seats_left(self) -> int:
        return self.config.max_num_seqs - len(self.running)

    def adopt(self, request: Request, new_tokens: int, schedule: "Schedule") -> None:
        """Run a request computed elsewhere from this iteration on, its `computed + new_tokens` tokens of KV
        in blocks on the GPU (PipeMax hands a streamed request back to an engine with room)."""
        self.tables.append(request.request_id, GPU, self.config.blocks_for(request.computed + new_tokens))
        self._join(request)
        schedule.work.append((request, new_tokens))

    def ran(self, batch: list[Request]) -> None:
        """The running batch after a decode run: those of `batch` (FCFS) still running, in its order."""
        self.running = [r for r in batch if r.state is State.RUNNING]
        self._in_order = True

    def _join(self, request: Request) -> None:
        """Add a request to the running batch, noting whether the batch stays in FCFS order."""
        running = self.running
        if running and self._in_order and FCFS(request) < FCFS(running[-1]):
            self._in_order = False
        running.append(request)

    def _fcfs(self) -> list[Request]:
        """The running batch in FCFS order (sorted only when a request joined out of order)."""
        return self.running if self._in_order else sorted(self.running, key=FCFS)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    # ---- one iteration
    def schedule(self) -> Schedule:
        out, c = Schedule(), self.config
        budget = c.max_num_batched_tokens
        if not c.chunked_prefill and not self.swapped:
            budget = self._admit(out, budget)
            if out.work:
                return out
        budget = self._run(out, budget)
        if not out.preempted:
            budget = self._swap_in(out, budget)
        if c.chunked_prefill and not out.preempted and not self.swapped:
            self._admit(out, budget)
        return out

    def _blocks_needed(self, request: Request, new_tokens: int) -> int:
        return self.config.blocks_for(request.computed + new_tokens) - len(self.tables.table(request.request_id))

    def _full_blocks(self, request: Request, new_tokens: int) -> int:
        """Of the blocks a step of `new_tokens` adds, how many it fills (read-only from then on)."""
        held = len(self.tables.table(request.request_id))
        return max(0, (request.computed + new_tokens) // self.config.block_size - held)

    def _place(self, request: Request, new_tokens: int, admitting: bool, unlimited: bool = False):
        return self.placement.place(self._blocks_needed(request, new_tokens), self._full_blocks(request, new_tokens),
                                    admitting, unlimited)

    def _grow(self, request: Request, new_tokens: int, admitting: bool = False) -> bool:
        """Append the blocks a step of `new_tokens` needs where the placement puts them, or none if they
        do not all fit."""
        runs = self._place(request, new_tokens, admitting)
        for tier, count in runs or ():
            self.tables.append(request.request_id, tier, count)
        return runs is not None

    def _run(self, out: Schedule, budget: int) -> int:
        """Each running sequence in FCFS order gets its next step, preempting from the latest-arrived while
        its blocks do not fit. Only the steps that need a block ask the placement: when every running
        sequence decodes one token within the budget and the seats (most iterations), those are found in
        one pass and the rest take their token without a look; the first refusal goes on one by one."""
        order, c = self._fcfs(), self.config
        size, tables, n = c.block_size, self.tables.tables, len(self.running)
        done = 0  # the FCFS prefix already given its step
        if n <= min(budget, c.max_num_seqs) and [r.prompt_tokens + r.generated - r.computed for r in order].count(1) == n:
            done = n
            for i in [i for i, r in enumerate(order) if -(-(r.computed + 1) // size) != len(tables.get(r.request_id, ()))]:
                if not self._grow(order[i], 1):
                    done = i  # a refusal: from this sequence on, one by one (a refused placement changed nothing)
                    break
            out.work = [(r, 1) for r in order[:done]]
            budget -= done
        queue, running, work = deque(order[done:]), list(order[:done]), out.work
        while queue and budget > 0 and len(running) < c.max_num_seqs:
            request = queue.popleft()
            new = min(request.prompt_tokens + request.generated - request.computed, budget)
            if -(-(request.computed + new) // size) != len(tables.get(request.request_id, ())):
                while not self._grow(request, new):
                    share_caused = self._place(request, new, False, unlimited=True) is not None
                    victim = queue.pop() if queue else request
                    if share_caused:
                        out.limited = True
                        out.refused.append(victim.computed)
                    self._preempt(victim, out)
                    if victim is request:
                        break
                else:
                    running.append(request)
                    work.append((request, new))
                    budget -= new
                continue
            running.append(request)
            work.append((request, new))
            budget -= new
        running.extend(queue)  # over the budget: they wait for the next iteration
        self.running, self._in_order = running, True
        return budget

    def _preempt(self, request: Request, out: Schedule) -> None:
        request.preemptions += 1
        out.preempted.append(request)
        seq = request.request_id
        gpu_blocks = self.tables.count(seq, GPU)
        if self.swap_preemption and self.tables.pools[CPU].num_free >= gpu_blocks:
            out.swap_out += self.tables.move(seq, GPU, CPU)
            request.state = State.SWAPPED
            self.swapped.append(request)
        else:
            self.tables.free(seq)
            request.computed, request.state = 0, State.WAITING
            self.waiting.appendleft(request)

    def _swap_in(self, out: Schedule, budget: int) -> int:
        c = self.config
        while self.swapped and budget > 0 and len(self.running) < c.max_num_seqs:
            request = self.swapped[0]
            blocks = self.tables.count(request.request_id, CPU) + self._blocks_needed(request, 1)
            if self.tables.pools[GPU].num_free - blocks < c.watermark_blocks:
                break
            self.swapped.popleft()
            out.swap_in += self.tables.move(request.request_id, CPU, GPU)
            self._grow(request, 1)
            request.state = State.RUNNING
            self._join(request)
            out.work.append((request, 1))
            budget -= 1
        return budget

    def _admit(self, out: Schedule, budget: int) -> int:
        c = self.config
        while self.waiting and len(self.running) < c.max_num_seqs:
            request = self.waiting[0]
            new = request.uncomputed if not c.chunked_prefill else min(request.uncomputed, budget)
            if new == 0 or new > budget:
                break
            if not self._grow(request, new, admitting=True):
                out.limited |= self._place(request, new, True, unlimited=True) is not None
                break
            self.waiting.popleft()
            request.state = State.RUNNING
            self._join(request)
            out.work.append((request, new))
            budget -= new
        return budget

    # ---- several plain decode iterations at once (the simulator's fast path, see decode_runs.py)
    def plain_decodes(self, copying: bool = False) -> list[Request] | None:
        """The running batch in FCFS order when the next iteration can only be every running sequence
        decoding one token (no queue it may admit from or be refused by the controller's share only, no
        swapped sequence that may come back, no unfinished prefill, new blocks on the GPU, and no live
        CPU block unless `copying`: the caller plans their copies); None otherwise."""
        c, running = self.config, self.running
        if not running or len(running) > c.max_num_batched_tokens or not self.placement.gpu_first:
            return None
        if self.placement.live_cpu and self.tables.pools[CPU].num_used and not copying:
            return None
        if self.swapped and not self._swap_in_blocked():
            return None
        if self.waiting and not self.swapped and (c.chunked_prefill or self._may_admit()):
            return None
        if any(r.prompt_tokens + r.generated - r.computed != 1 for r in running):  # an unfinished prefill
            return None
        return list(self._fcfs())

    def _swap_in_blocked(self) -> bool:
        """Whether the oldest swapped-out sequence cannot come back now (`_swap_in`'s tests, before this
        iteration's blocks are taken): then none can until a running sequence finishes and frees blocks."""
        c, head = self.config, self.swapped[0]
        if len(self.running) >= min(c.max_num_seqs, c.max_num_batched_tokens):
            return True
        blocks = self.tables.count(head.request_id, CPU) + self._blocks_needed(head, 1)
        return self.tables.pools[GPU].num_free - blocks < c.watermark_blocks

    def _may_admit(self) -> bool:
        """Whether admission could take the head of the queue now, or be refused by the controller's share
        alone (which then grows): either way the next iteration is not a plain decode. While a queue waits
        a decode run ends at the first finish, so blocks only go and this stays false."""
        c, head = self.config, self.waiting[0]
        if len(self.running) >= c.max_num_seqs or head.uncomputed > c.max_num_batched_tokens:
            return False
        return self._place(head, head.uncomputed, admitting=True, unlimited=True) is not None

    def complete(self, schedule: Schedule, now: float) -> list[Request]:
        """Advance every scheduled request by its step; free and return the ones that finished."""
        finished = []
        for request, new in schedule.work:
            if request.advance(new, now):
                self.tables.free(request.request_id)
                self.running.remove(request)
                finished.append(request)
        return finished
