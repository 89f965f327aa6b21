"""Executes pie_policy's plans for real: a transformer over the paged KV cache, layer by layer, with the
plan's copies in flight on the copier while layers compute.

Per layer: issue the copies the plan issues when the layer is reached, wait for the ones it awaits (the
stall), compute the layer (attention over the sequences' blocks, new K and V stored where their blocks
live), then issue its write-backs. Greedy sampling. Times are measured on the device: host clocks on
the CPU, CUDA events on the compute stream on a GPU.

An executor may also hold a contiguous slice of the layers, as a pipeline stage does (pipeline.py): it
then runs the same plan for its own layers only, with its own KV pools. It still walks every layer's
step in order, running the copies of its layers' data (all of them would be in the plan's order), so
that copies the plan issues at another stage's layer keep their place relative to this stage's work:
those reached before its first layer are issued before it takes its input, their waits held until
its first layer computes; those after its last layer are issued once it has computed.
"""
from __future__ import annotations

import ctypes
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pie_policy import Copy, IterationStats, Plan
from pie_policy.layerswap import runs
from pie_policy.plan import BLOCK_KV, D2H, H2D, LAYER_KV

from .copier import STREAM, CpuCopier, CudaCopier
from .kvcache import BatchLayout, PagedKV
from .model import Transformer


def paged_attend(layout: BatchLayout, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Store the new tokens' K, V and attend over each sequence's context: q [T, heads, head_dim]."""
    layout.store(layer, k, v)
    keys, values = layout.gather(layer)                # [B, keys, kv_heads, head_dim] each
    queries = q.new_zeros((layout.batch, layout.max_new, *q.shape[1:]))
    queries[layout.seq_of, layout.index] = q
    out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=layout.mask, enable_gqa=True)  # heads share KV heads
    return out.transpose(1, 2)[layout.seq_of, layout.index]


def keep_freed_host_memory() -> None:
    """Have glibc's malloc keep freed memory instead of giving it back to the OS. Otherwise a layer's
    temporaries over its mmap threshold (32 MiB at most: the padded K and V of 16 sequences of 1024 tokens
    of OPT-125M in FP32 are 48 MiB each) are mapped and page-faulted afresh in every layer, which made
    that layer ~3x slower (83 ms instead of 29) and its time non-linear in the batch. A caching
    allocator does the same on a GPU. No-op where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 1 << 30)


class _HostClock:
    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return end - start


class _CudaClock:
    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3


def device_clock(device: torch.device) -> _HostClock | _CudaClock:
    """The clock compute on `device` is timed with: the host's, or CUDA events on the current stream."""
    return _CudaClock() if device.type == "cuda" else _HostClock()


@dataclass(frozen=True)
class StageTimes:
    """What an executor measured of one plan over its layers: from taking its input to its output."""
    total_s: float
    layer_compute_s: tuple[float, ...]
    layer_stall_s: tuple[float, ...]

    @property
    def stall_s(self) -> float:
        return sum(self.layer_stall_s)

    @property
    def compute_s(self) -> float:
        return self.total_s - self.stall_s


class Executor:
    """Runs plans for real on one device: owns the model's layers it computes, their paged KV (`PagedKV`),
    the copier that carries the plans' copies and the device clock that times them. It never decides:
    every block, copy and wait comes from the plan."""

    def __init__(self, model: Transformer, config, device: torch.device, staging_slots: int,
                 layers: range | None = None, copy_ordering: str = STREAM):
        """`layers`: the slice of the model's layers this executor computes (default all of them);
        `copy_ordering`: what a copy waits for on a GPU (copier.py's ORDERINGS)."""
        self.model, self.config, self.device = model, config, device
        self.layers = range(config.num_layers) if layers is None else layers
        if not (self.layers.step == 1 and 0 <= self.layers.start < self.layers.stop <= config.num_layers):
            raise ValueError(f"layers {self.layers}: not a non-empty slice of the model's {config.num_layers} layers")
        self.first, self.last = self.layers.start == 0, self.layers.stop == config.num_layers
        self.whole = self.first and self.last
        spec = model.spec
        self.kv = PagedKV(config, spec.num_kv_heads, spec.head_dim, next(model.parameters()).dtype, device,
                          staging_slots, self.layers)
        cuda = device.type == "cuda"
        if not cuda:
            keep_freed_host_memory()
        self.copier = CudaCopier(device, copy_ordering) if cuda else CpuCopier()
        self.clock = device_clock(device)
        self._last_write_back: int | None = None  # the latest device-to-host copy issued here

    def _work(self, copy: Copy):
        """The tensor copies that carry out `copy`, one call per run (per block and layer for vLLM's swap)."""
        kv, non_blocking = self.kv, self.device.type == "cuda"
        if copy.kind == LAYER_KV:
            staging, cpu = kv.staging[copy.staging], kv.cpu[kv.row(copy.layer)]
            src, dst = (cpu, staging) if copy.direction == H2D else (staging, cpu)
            jobs = [(dst[d:d + n], src[s:s + n]) for s, d, n in runs(copy.pairs)]
        elif copy.kind == BLOCK_KV:
            src, dst = (kv.cpu, kv.gpu) if copy.direction == H2D else (kv.gpu, kv.cpu)
            jobs = [(dst[row, d], src[row, s]) for row in range(len(self.layers)) for s, d in copy.pairs]
        else:
            raise ValueError(f"the executor cannot run {copy.kind} copies (FlexGen runs in the simulator only)")

        def work() -> None:
            for target, source in jobs:
                target.copy_(source, non_blocking=non_blocking)
        return work

    def _local(self, copy: Copy) -> Copy | None:
        """The part of `copy` this executor runs, None if nothing. The whole model runs every copy as it is.
        A slice runs a layer's copy when it holds the layer, and a whole-block copy for its layers (`_work`).
        A prefetch into a staging slot is ordered after the slot's last write-back, which may be another
        stage's: the slice orders it after its own latest write-back instead, which (one direction's copies
        complete in order) covers every earlier one here, the slot's and the prefetched blocks' own."""
        if self.whole:
            return copy
        if copy.kind == LAYER_KV and copy.layer not in self.layers:
            return None
        if copy.kind == LAYER_KV and copy.direction == H2D and self._last_write_back is not None:
            copy = dataclasses.replace(copy, after=copy.after + (self._last_write_back,))
        if copy.direction == D2H:
            self._last_write_back = copy.op_id
        return copy

    def _issue(self, copies) -> None:
        for copy in copies:
            local = self._local(copy)
            if local is not None:
                self.copier.issue(local, self._work(local))

    def _issue_ahead(self, plan: Plan) -> tuple[int, ...]:
        """Issue the prologue and the copies of the layers before this executor's first; returns those
        layers' waits (held until its first layer computes)."""
        self._issue(plan.prologue)
        waits: tuple[int, ...] = ()
        for layer in range(self.layers.start):
            step = plan.step(layer)
            self._issue(step.issue)
            waits += step.wait
            self._issue(step.evict)
        return waits

    def _issue_behind(self, plan: Plan) -> None:
        """The steps of the layers after this executor's last, in order (their waits hold back the next plan)."""
        for layer in range(self.layers.stop, self.config.num_layers):
            step = plan.step(layer)
            self._issue(step.issue)
            self.copier.wait(step.wait)
            self._issue(step.evict)

    @torch.inference_mode()
    def run_stage(self, plan: Plan, layout: BatchLayout, take_input: Callable[[], torch.Tensor]):
        """Run one plan over this executor's layers. `take_input()` gives the new tokens' ids on the first
        stage, the hidden states from the stage before on the others; it is called once the copies that
        precede the first layer are issued (on a later stage they overlap the stages before it). Returns
        (output, logits, times): on the last stage the sampled token ids of the sequences that sample, in
        plan order, and their logits; on the others the hidden states and None."""
        begin = self.clock.mark() if self.first else None
        waits = self._issue_ahead(plan)
        x = take_input()
        if self.first:
            h = self.model.embed(x, layout.positions)
        else:
            h, begin = x, self.clock.mark()
        marks = []
        for layer in self.layers:
            step = plan.step(layer)
            self._issue(step.issue)
            before = self.clock.mark()
            self.copier.wait(waits + step.wait)
            after = self.clock.mark()
            waits = ()
            h = self.model.layers[layer](h, layout.positions,
                                         lambda q, k, v, layer=layer: paged_attend(layout, layer, q, k, v))
            marks.append((before, after, self.clock.mark()))
            self.copier.computed(layer, plan.staging_slots[layer] if plan.staging_slots else None, marks[-1][2])
            self._issue(step.evict)
        output, logits = h, None
        if self.last:
            logits = self.model.logits(h[layout.sample_tokens])
            output = logits.argmax(dim=-1).tolist()  # synchronizes the compute stream
        end = self.clock.mark()
        self._issue_behind(plan)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        times = StageTimes(self.clock.seconds(begin, end), tuple(self.clock.seconds(a, c) for _, a, c in marks),
                           tuple(self.clock.seconds(b, a) for b, a, _ in marks))
        return output, logits, times

    def execute(self, plan: Plan, token_ids: list[list[int]], run_start: float):
        """Run one plan over the whole model; `token_ids` are each sequence's new tokens. Returns (stats,
        sampled token ids of the sequences that sample, in plan order, and their logits)."""
        if not self.whole:
            raise ValueError(f"execute runs the whole model; this executor holds layers {self.layers} (a stage)")
        start_s = time.perf_counter() - run_start
        layout = self.kv.bind(plan)
        ids = torch.tensor([t for seq in token_ids for t in seq], device=self.device)
        sampled, logits, times = self.run_stage(plan, layout, lambda: ids)
        busy = self.copier.take_busy()
        stats = IterationStats(plan.iteration, start_s, time.perf_counter() - run_start, times.compute_s,
                               times.stall_s, *plan.bytes_moved(), busy["h2d"], busy["d2h"], times.layer_compute_s,
                               times.layer_stall_s)
        return stats, sampled, logits

    def close(self) -> None:
        self.copier.close()
