"""Pipeline parallelism over N GPUs: the plain vLLM-style baseline (pp-vllm) and PipeMax, one policy class.

Both run M micro-batches, each a vLLM (V0) virtual engine: its own continuous-batching `Scheduler`
(batching.py) over its 1/M share of the pipeline's KV blocks, as vLLM V0 splits them; a request joins the
engine with the fewest unfinished requests when it arrives and stays there. A micro-batch's next iteration
is planned once its previous one has come back from the last stage (its sampled tokens are needed) and, by
the simulator, as late as it can be: only when the first stage has started every plan made before it.

- pp-vllm: M = N (vLLM's virtual engines), KV only in HBM: each GPU holds its layers' part of every
  running request's KV, so the node runs as many sequences as its tightest GPU's KV pool holds.
- pipemax: the same engines (M = N by default; more split the resident KV among more engines, so more
  weight passes per token), and the requests HBM cannot hold streamed from CPU memory through a staging
  slot within each window's budget, chosen greedily (pipemax.py, which states the assumptions).

A plan carries its micro-batch and, per stage, a `LayerStep` of copies on that stage's GPU, as a
single-GPU plan carries one per layer: `issue` when the stage takes the plan (PipeMax: the next plan's prefetch),
`wait` before it computes (this plan's prefetch, issued by the plan before), `evict` after (write-back).
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import count
from typing import Callable

from hwmodels import CostModel

from .batching import Schedule, Scheduler
from .blocks import CPU, GPU, BlockTables
from .config import ConfigError, EngineConfig
from .pipeline_layout import StageLayout
from .pipemax import Group, Streamer
from .placement import GpuOnly
from .plan import Copy, IterationStats, LayerStep, Plan, SeqWork
from .policies import shape_of, work_of
from .registry import PIPELINE, names
from .request import Request

PIPELINE_POLICIES = names(PIPELINE)


def check_micro_batches(micro_batches: int, stages: int) -> int:
    """At least one micro-batch per stage, or some stage always idles."""
    if micro_batches < stages:
        raise ConfigError(f"{micro_batches} micro-batches cannot fill {stages} pipeline stages")
    return micro_batches


def _stage_step(stage: int, now: tuple, group: Group | None, ahead: Group | None) -> LayerStep:
    """A stage's copies for a plan: the prefetches it issues as it takes the plan (the next plan's group's,
    and this one's if nothing issued it before), the one it waits for, the write-back after it computes."""
    issue = now[stage:stage + 1] + (ahead.prefetch[stage:stage + 1] if ahead else ())
    if group is None:
        return LayerStep(issue)
    return LayerStep(issue, (group.prefetch[stage].op_id,), (group.writeback[stage],))


class PipelinePolicy:
    """pp-vllm or pipemax as a `ServingPolicy`: owns one scheduler per micro-batch (a virtual engine with
    its share of the blocks) and, for pipemax, the streamer of the requests HBM cannot hold."""

    def __init__(self, name: str, config: EngineConfig, layout: StageLayout, micro_batches: int,
                 cost_model: CostModel, streamer: Streamer | None = None):
        if name not in PIPELINE_POLICIES:
            raise ConfigError(f"unknown pipeline policy '{name}' (known: {', '.join(PIPELINE_POLICIES)})")
        check_micro_batches(micro_batches, layout.num_stages)
        self.name, self.config, self.layout, self.cost_model = name, config, layout, cost_model
        self.streamer = streamer
        self.schedulers = []
        for _ in range(micro_batches):
            tables = BlockTables(config.num_gpu_blocks, 0)
            self.schedulers.append(Scheduler(config, tables, GpuOnly(tables, config.watermark_blocks), False))
        self._iterations = count()
        self._pending: dict[int, tuple[Plan, Schedule, Group | None]] = {}
        self._next_group: Group | None = None  # PipeMax: chosen with the latest plan, for the next

    @property
    def micro_batches(self) -> int:
        return len(self.schedulers)

    # ---- requests
    def add_request(self, request_id: int, arrival_s: float, prompt_tokens: int, output_tokens: int) -> Request:
        """Queue a request on the engine with the fewest unfinished requests (vLLM's rule); it comes back
        REJECTED, with the reason, when it can never run (PipeMax: neither resident nor streamed)."""
        request = Request(request_id, arrival_s, prompt_tokens, output_tokens)
        engine = min(self.schedulers, key=lambda s: len(s.waiting) + len(s.running))
        if self.streamer and engine.refusal(request.max_context) and self.streamer.streamable(request):
            engine.enqueue(request)  # too big for the engine's blocks: only ever streamed
        else:
            engine.add(request)
        return request

    @property
    def has_work(self) -> bool:
        return any(s.has_work for s in self.schedulers) or bool(self.streamer and self.streamer.has_work)

    @property
    def kv_bytes(self) -> tuple[int, int]:
        """KV bytes held in HBM (all GPUs together: every layer) and in CPU memory."""
        gpu = sum(s.tables.pools[GPU].num_used for s in self.schedulers) * self.config.block_bytes
        return gpu, self.streamer.tables.pools[CPU].num_used * self.config.block_bytes if self.streamer else 0

    @property
    def cpu_share(self) -> float:
        gpu, cpu = self.kv_bytes
        return cpu / (gpu + cpu) if gpu + cpu else 0.0

    # ---- iterations
    def next_iteration(self, micro_batch: int = 0) -> Plan | None:
        """The next iteration of `micro_batch` (whose previous one has come back), or None when it has
        nothing to run. PipeMax adds the streamed group chosen with the plan before, and chooses the next;
        a micro-batch with no resident work takes the group alone only while the pipeline has a free
        stage (else the group waits for the next engine with work, rather than delaying it)."""
        engine = self.schedulers[micro_batch]
        schedule = engine.schedule()
        seqs: Sequence[SeqWork]  # a Batch, or a tuple when a streamed group joins
        seqs, group = work_of(schedule.work, engine.tables), self._next_group
        now: tuple[Copy, ...] = ()
        if self.streamer and not seqs:
            if group is None and not self._pending:  # an empty pipeline: choose and prefetch now
                group = self.streamer.select(0.0, self._spilled, force=True)
                now = group.prefetch if group else ()
            elif len(self._pending) >= self.layout.num_stages:
                group = None
        if group:
            self._adopt(engine, schedule, group)
            assert self.streamer is not None  # a group is the streamer's
            seqs = work_of(schedule.work, engine.tables) + work_of(group.work, self.streamer.tables)
        if not seqs:
            return None
        shape = shape_of(seqs)
        stages: tuple[LayerStep, ...] = ()
        if self.streamer:
            ahead = self._next_group = self.streamer.select(self.cost_model.layer_time(shape), self._spilled)
            stages = tuple(_stage_step(s, now, group, ahead) for s in range(self.layout.num_stages))
        plan = Plan(next(self._iterations), seqs, shape, layers=stages, micro_batch=micro_batch)
        self._pending[plan.iteration] = (plan, schedule, group)
        return plan

    def _adopt(self, engine: Scheduler, schedule: Schedule, group: Group) -> None:
        """Resident first: the group's requests that `engine` has blocks and seats for now join it, their
        KV kept in HBM from this iteration on (their copies were sized with the group: a write-back of their
        new tokens still goes out)."""
        assert self.streamer is not None  # a group is the streamer's
        c, gpu = engine.config, engine.tables.pools[GPU]
        for request, new in list(group.work):
            blocks = c.blocks_for(request.computed + new)
            if engine.seats_left() <= 0 or gpu.num_free - blocks < c.watermark_blocks:
                continue
            self.streamer.release(group, request)
            engine.adopt(request, new, schedule)

    def _spilled(self, streamable: Callable[[Request], bool]) -> tuple[Scheduler, Request] | None:
        """The oldest `streamable` request at the head of an engine's queue that its engine cannot admit now
        (no seat or no blocks), with its engine: what PipeMax may stream instead."""
        heads = []
        for engine in self.schedulers:
            if engine.waiting and streamable(head := engine.waiting[0]):
                c = engine.config
                if engine.seats_left() <= 0 or engine.placement.place(
                        c.blocks_for(head.context), admitting=True) is None:
                    heads.append((head.arrival_s, head.request_id, engine, head))
        return min(heads)[2:] if heads else None

    def observe(self, plan: Plan, stats: IterationStats) -> list[Request]:
        """Account for a plan that has come back from the last stage; returns the requests that finished."""
        _, schedule, group = self._pending.pop(plan.iteration)
        finished = self.schedulers[plan.micro_batch].complete(schedule, stats.end_s)
        if group is None:
            return finished
        assert self.streamer is not None  # a group is the streamer's
        return finished + self.streamer.complete(group, stats.end_s)
