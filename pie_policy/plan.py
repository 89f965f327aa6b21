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
from typing import Callable, Iterator, NamedTuple, Sequence

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


class SeqWork(NamedTuple):
    """One sequence of a plan."""
    request_id: int
    new_tokens: int                      # tokens whose KV this iteration computes
    cached_tokens: int                   # tokens already in the cache
    samples: bool                        # whether the sequence emits a token this iteration
    blocks: tuple                        # its block table (BlockRef) after this iteration's allocation


class Batch(Sequence):
    """A plan's sequences, kept as the parts they are made of and made into `SeqWork`s when first read:
    a plan has one per running sequence every iteration, and the simulator reads only how many there are
    (and the sums in the plan's shape). The parts are taken when the plan is made, the block tables as
    their list and length then: tables only ever grow at their end or are replaced (blocks.py), so the
    table a plan saw is that list's first `length` blocks whenever it is read."""

    def __init__(self, ids: list[int], new: list[int], cached: list[int], context: list[int],
                 tables: list[list], lengths: list[int]):
        self.ids, self.new, self.cached, self.context = ids, new, cached, context
        self._tables, self._lengths = tables, lengths
        self._made: tuple[SeqWork, ...] | None = None

    def made(self) -> tuple[SeqWork, ...]:
        if self._made is None:
            self._made = tuple(SeqWork(rid, new, cached, cached + new == context, tuple(table[:length]))
                               for rid, new, cached, context, table, length in
                               zip(self.ids, self.new, self.cached, self.context, self._tables, self._lengths))
        return self._made

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index):
        return self.made()[index]

    def __iter__(self):
        return iter(self.made())

    def __add__(self, other) -> tuple[SeqWork, ...]:
        return self.made() + tuple(other)

    def __eq__(self, other) -> bool:
        return self.made() == tuple(other) if isinstance(other, (tuple, Batch)) else NotImplemented

    __hash__ = None  # type: ignore[assignment]  # unhashable, Python's way; typeshed has only a method

    def __repr__(self) -> str:
        return f"Batch({self.made()!r})"

    def __reduce__(self):
        return tuple, (self.made(),)


def sampling_ids(seqs: Sequence[SeqWork]) -> list[int]:
    """The request ids of the sequences that emit a token (`SeqWork.samples`), in order; from a `Batch`'s
    parts without making its `SeqWork`s (the serving loop asks every iteration)."""
    if isinstance(seqs, Batch):
        return [rid for rid, new, cached, context in zip(seqs.ids, seqs.new, seqs.cached, seqs.context)
                if cached + new == context]
    return [s.request_id for s in seqs if s.samples]


@dataclass(frozen=True)
class Plan:
    """One iteration of one engine: which sequences compute how many tokens (`seqs`, summed up in
    `shape`) and the copies around them. `layers` has one step per layer, or, in a pipeline policy's
    plan, one per stage (a stage's copies are issued, awaited and written back around its layers as one);
    it is empty when nothing is copied. Layer swapping's steps are a compact record (`swap`,
    layerswap.LayerSwap) that `layers` expands when read; the simulator prices the record itself."""
    iteration: int
    seqs: Sequence[SeqWork]              # a tuple, or a `Batch` (the same, made when read)
    shape: BatchShape
    prologue: tuple[Copy, ...] = ()      # issued before layer 0 (whole-block swaps, first prefetches)
    layers: Sequence[LayerStep] = ()     # one per layer (per stage in a pipeline plan), or empty: no copies
    staging_slots: tuple[int, ...] = ()  # per layer, the staging slot its CPU blocks are read from
    gpu_batches: tuple[BatchShape, ...] = ()  # FlexGen: `shape` split into batches computed one after another
    micro_batch: int = 0                 # the virtual engine it belongs to (pipeline policies)

    def step(self, layer: int) -> LayerStep:
        return self.layers[layer] if self.layers else NO_OPS

    @property
    def swap(self):
        """The layer-swap record (layerswap.LayerSwap) the layers are made of, or None."""
        return getattr(self.layers, "record", None)

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
        swap = self.swap
        for copy in self.copies() if swap is None else self.prologue:
            if copy.direction in moved:
                moved[copy.direction] += copy.nbytes
        if swap is not None:  # the layers' copies, without expanding them
            moved[H2D] += swap.num_layers * swap.fetch.nbytes
            moved[D2H] += swap.num_layers * swap.write.nbytes if swap.write is not None else 0
        return moved[H2D], moved[D2H]


class RunStep(NamedTuple):
    """One iteration of a decode run."""
    sequences: int
    attended: int                # Σ positions attended
    padded: int                  # sequences × the longest one's positions
    gpu_blocks: int              # GPU blocks held after it (its finished sequences' freed)
    gpu_blocks_during: int       # GPU blocks held while it runs (its new blocks taken, none freed yet)
    cpu_freed: int = 0           # CPU blocks its finished sequences free (then the run ends after it)
    swap: object = None          # its layer-swap record (layerswap.LayerSwap) when the run copies
    cpu_share: float = 0.0       # the share of the live KV in CPU memory after it

    @property
    def shape(self) -> BatchShape:
        """Its batch, as a plan of these decodes has it (`BatchShape.decoding` of its sums)."""
        n = self.sequences
        return BatchShape.decoding(n, self.attended - n, self.padded // n - 1)


@dataclass(frozen=True)
class DecodeRun:
    """Plain decode iterations planned at once because nothing but arithmetic changes in them: every
    running sequence decodes one token, with no admission and no preemption, and with the same copies in
    every iteration if any (see decode_runs.py). `steps` yields, lazily, a `RunStep` for iteration
    `first_iteration`, the next, ... until the run must end; a step is planned as it is drawn (a copying
    one takes its copy ids then), so a backend draws only what it runs (the simulator stops at the next
    arrival) and commits how many. With `observe`, the policy's controller is fed each iteration's stats
    as a backend runs it (`observe(stats, step)`, False when the run must end after that iteration)."""
    first_iteration: int
    steps: Iterator[RunStep]
    block_bytes: int             # bytes of one whole block (all layers)
    cpu_blocks: int = 0          # CPU blocks held throughout (live KV the steps' records copy, or swap space)
    copies: bool = False         # whether the steps carry layer-swap records
    observe: Callable[["IterationStats", RunStep], bool] | None = None


class IterationStats(NamedTuple):
    """What a backend measured for one plan; the same fields from the simulator and the executor (a named
    tuple: a simulated run makes one for every iteration, its decode runs' too)."""
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
