"""Executes pie_policy's plans for real: a transformer over the paged KV cache, layer by layer, with the
plan's copies in flight on the copier while layers compute.

Per layer: issue the copies the plan issues when the layer is reached, wait for the ones it awaits (the
stall), compute the layer (attention over the sequences' blocks, new K and V stored where their blocks
live), then issue its write-backs. Greedy sampling. Times are measured on the device: host clocks on
the CPU, CUDA events on the compute stream on a GPU.
"""
from __future__ import annotations

import ctypes
import time

import torch
import torch.nn.functional as F

from pie_policy import Copy, IterationStats, Plan
from pie_policy.layerswap import runs
from pie_policy.plan import BLOCK_KV, H2D, LAYER_KV

from .copier import CpuCopier, CudaCopier
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


class Executor:
    def __init__(self, model: Transformer, config, device: torch.device, staging_slots: int):
        self.model, self.config, self.device = model, config, device
        spec = model.spec
        self.kv = PagedKV(config, spec.num_kv_heads, spec.head_dim, next(model.parameters()).dtype, device,
                          staging_slots)
        cuda = device.type == "cuda"
        if not cuda:
            keep_freed_host_memory()
        self.copier = CudaCopier(device) if cuda else CpuCopier()
        self.clock = _CudaClock() if cuda else _HostClock()

    def _work(self, copy: Copy):
        """The tensor copies that carry out `copy`, one call per run (per block and layer for vLLM's swap)."""
        kv, non_blocking = self.kv, self.device.type == "cuda"
        if copy.kind == LAYER_KV:
            staging, cpu = kv.staging[copy.staging], kv.cpu[copy.layer]
            src, dst = (cpu, staging) if copy.direction == H2D else (staging, cpu)
            jobs = [(dst[d:d + n], src[s:s + n]) for s, d, n in runs(copy.pairs)]
        elif copy.kind == BLOCK_KV:
            src, dst = (kv.cpu, kv.gpu) if copy.direction == H2D else (kv.gpu, kv.cpu)
            jobs = [(dst[layer, d], src[layer, s]) for layer in range(self.config.num_layers) for s, d in copy.pairs]
        else:
            raise ValueError(f"the executor cannot run {copy.kind} copies (FlexGen runs in the simulator only)")

        def work() -> None:
            for target, source in jobs:
                target.copy_(source, non_blocking=non_blocking)
        return work

    def _issue(self, copies) -> None:
        for copy in copies:
            self.copier.issue(copy, self._work(copy))

    @torch.inference_mode()
    def execute(self, plan: Plan, token_ids: list[list[int]], run_start: float):
        """Run one plan; `token_ids` are each sequence's new tokens. Returns (stats, sampled token ids of
        the sequences that sample, in plan order, and their logits)."""
        start_s = time.perf_counter() - run_start
        layout = self.kv.bind(plan)
        ids = torch.tensor([t for seq in token_ids for t in seq], device=self.device)
        marks = []
        begin = self.clock.mark()
        self._issue(plan.prologue)
        h = self.model.embed(ids, layout.positions)
        for layer, block in enumerate(self.model.layers):
            step = plan.step(layer)
            self._issue(step.issue)
            before = self.clock.mark()
            self.copier.wait(step.wait)
            after = self.clock.mark()
            h = block(h, layout.positions, lambda q, k, v, layer=layer: paged_attend(layout, layer, q, k, v))
            marks.append((before, after, self.clock.mark()))
            self._issue(step.evict)
        logits = self.model.logits(h[layout.sample_tokens])
        sampled = logits.argmax(dim=-1).tolist()  # synchronizes the compute stream
        end = self.clock.mark()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        layer_stall = tuple(self.clock.seconds(b, a) for b, a, _ in marks)
        layer_compute = tuple(self.clock.seconds(a, c) for _, a, c in marks)
        stall, total = sum(layer_stall), self.clock.seconds(begin, end)
        busy = self.copier.take_busy()
        stats = IterationStats(plan.iteration, start_s, time.perf_counter() - run_start, total - stall, stall,
                               *plan.bytes_moved(), busy["h2d"], busy["d2h"], layer_compute, layer_stall)
        return stats, sampled, logits

    def close(self) -> None:
        self.copier.close()
