"""The contract between the policy and the backends: plans go down, stats come back; both plain data.

A plan is one iteration: the sequences and how many tokens each computes, and for every layer the
copies to issue when the layer is reached, the copies that must be complete before it computes, and the
copies to issue once it has computed. Copy ids are unique over a run, so a copy may wait on one issued
in an earlier iteration (a staging slot's previous occupant), and a layer may wait on a prefetch the
previous plan issued for it. Copies of one direction complete in issue order (one stream each), which
the ordering of write-backs and prefetches relies on. Times are seconds, sizes bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from hwmodels import BatchShape

H2D, D2H = "h2d", "d2h"
# FlexGen's third tier: a disk reached through CPU memory, read into it and written from it (one queue each).
DISK_READ, DISK_WRITE = "disk-read", "disk-write"
# What a copy moves. A layer-KV copy moves one layer of some blocks between the CPU pool and a GPU
# staging slot, where a block keeps its CPU slot number as its row (pairs: CPU slot ↔ the same row);
# a block-KV copy moves whole blocks (all layers)
# between the GPU and CPU pools (pairs: source slot → destination slot); weights and activations
# (FlexGen) carry bytes only.
LAYER_KV, BLOCK_KV, WEIGHTS, ACTIVATIONS = "layer-kv", "block-kv", "weights", "activations"


@dataclass(frozen=True)
class Copy:
    op_id: int
    direction: str                       # H2D, D2H, DISK_READ or DISK_WRITE
    kind: str                            # LAYER_KV, BLOCK_KV, WEIGHTS or ACTIVATIONS
    layer: int | None                    # the layer whose data moves; None for all layers
    pairs: tuple[tuple[int, int], ...]   # (source, destination) slots, see `kind`
    nbytes: int
    calls: int                           # transfer calls, each paying the link's fixed latency
    after: tuple[int, ...] = ()          # copies that must complete before this one starts
    staging: int | None = None           # LAYER_KV: the staging slot it fills or empties


@dataclass(frozen=True)
class LayerStep:
    issue: tuple[Copy, ...] = ()         # issued when the layer is reached, before waiting
    wait: tuple[int, ...] = ()           # copy ids that must be complete before the layer computes
    evict: tuple[Copy, ...] = ()         # issued once the layer has computed


NO_OPS = LayerStep()


@dataclass(frozen=True)
class SeqWork:
    request_id: int
    new_tokens: int                      # tokens whose KV this iteration computes
    cached_tokens: int                   # tokens already in the cache
    samples: bool                        # whether the sequence emits a token this iteration
    blocks: tuple                        # its block table (BlockRef) after this iteration's allocation


@dataclass(frozen=True)
class Plan:
    """One iteration of one engine: which sequences compute how many tokens (`seqs`, summed up in
    `shape`) and the copies around them. `layers` has one step per layer, or, in a pipeline policy's
    plan, one per stage (a stage's copies are issued, awaited and written back around its layers as one);
    it is empty when nothing is copied."""
    iteration: int
    seqs: tuple[SeqWork, ...]
    shape: BatchShape
    prologue: tuple[Copy, ...] = ()      # issued before layer 0 (whole-block swaps, first prefetches)
    layers: tuple[LayerStep, ...] = ()   # one per layer (per stage in a pipeline plan), or empty: no copies
    staging_slots: tuple[int, ...] = ()  # per layer, the staging slot its CPU blocks are read from
    gpu_batches: tuple[BatchShape, ...] = ()  # FlexGen: `shape` split into batches computed one after another
    micro_batch: int = 0                 # the virtual engine it belongs to (pipeline policies)

    def step(self, layer: int) -> LayerStep:
        return self.layers[layer] if self.layers else NO_OPS

    def batches(self) -> tuple[BatchShape, ...]:
        """What each layer computes, batch after batch (each reads the layer's weights again)."""
        return self.gpu_batches or (self.shape,)

    def copies(self):
        """Every copy of the plan, in issue order."""
        yield from self.prologue
        for step in self.layers:
            yield from step.issue
            yield from step.evict

    def bytes_moved(self) -> tuple[int, int]:
        """Bytes the plan's copies move host→device and device→host (disk reads and writes stay off the link)."""
        moved = {H2D: 0, D2H: 0}
        for copy in self.copies():
            if copy.direction in moved:
                moved[copy.direction] += copy.nbytes
        return moved[H2D], moved[D2H]


@dataclass(frozen=True)
class DecodeRun:
    """Plain decode iterations planned at once because nothing but arithmetic changes in them: every
    running sequence decodes one token, with no copies, no admission and no preemption (see
    decode_runs.py). `steps` yields, lazily, (sequences, Σ positions attended, sequences × the longest
    one's positions, GPU blocks held after) of iteration `first_iteration`, the next, ... until the run
    must end. A backend runs a prefix of it (the simulator stops at the next arrival) and commits how many."""
    first_iteration: int
    steps: Iterator[tuple[int, int, int, int]]
    block_bytes: int             # bytes of one whole block (all layers)


@dataclass(frozen=True)
class IterationStats:
    """What a backend measured for one plan; the same fields from the simulator and the executor."""
    iteration: int
    start_s: float
    end_s: float
    compute_s: float       # GPU busy computing
    stall_s: float         # GPU waiting for copies it needed
    bytes_h2d: int
    bytes_d2h: int
    h2d_busy_s: float      # time the host→device direction was transferring
    d2h_busy_s: float
    layer_compute_s: tuple[float, ...] = ()  # per layer, where the backend measures layers
    layer_stall_s: tuple[float, ...] = ()

    @classmethod
    def of(cls, plan: Plan, start_s: float, end_s: float, compute_s: float, stall_s: float, h2d_busy_s: float = 0.0,
           d2h_busy_s: float = 0.0, layer_compute_s: tuple[float, ...] = (),
           layer_stall_s: tuple[float, ...] = ()) -> "IterationStats":
        """The stats of `plan` with the bytes its copies move (every backend moves exactly those)."""
        return cls(plan.iteration, start_s, end_s, compute_s, stall_s, *plan.bytes_moved(), h2d_busy_s, d2h_busy_s,
                   layer_compute_s, layer_stall_s)
