"""FIFO layer swapping (Pie's performance-transparent swapping).

Each CPU-resident KV block of the batch is needed on the GPU once per layer. The GPU keeps a staging
area of `depth + 1` slots, each a mirror of one layer of the CPU pool (a block keeps its CPU slot number
as its row, so at most `capacity` = CPU-pool blocks a slot). Layers take staging slots in turn, counting
on across iterations (layer l of the k-th plan uses slot (k·L + l) mod (depth + 1)), and copies go:

    when layer l is reached   prefetch layer l + depth (for l + depth >= L: layer l + depth - L of the
                              next iteration, for this batch's CPU blocks), then wait for layer l's
    after layer l computes    write layer l's staged blocks back to the CPU pool (evict)
    before layer 0            prefetch, for layers 0 … depth-1, the CPU blocks the previous plan did not
                              already prefetch for them (new blocks, new sequences: the prologue)

Slots are reused first-in first-out: a prefetch lands in the slot the layer before the reaching one just
left, so it is ordered after that slot's last write-back. With `dirty_only`, only blocks this iteration
wrote into (its new tokens) are written back — the CPU copy of every other block is still valid.
Blocks with consecutive CPU slots (the allocator hands out the lowest free slot) go in one call. A
prefetch also spans gaps of at most `coalesce_gap` slots between two runs (their rows land in staging
rows no layer reads): one call instead of two, worth it while the gap's bytes take less time on the link
than a call's fixed latency. Write-backs never span gaps (they would overwrite other blocks' CPU copies).

A plan's copies are alike in every layer but for their layer, staging slot and ids, so the planner hands
out one compact record (`LayerSwap`): the runs each direction copies (`SwapCopies`, kept while the CPU
blocks do not change) and the arithmetic that numbers and orders the copies. `LayerSwap.expand` turns it
into the per-layer `Copy` objects the executor and the per-layer SimPy check run; the simulator's timeline
prices the record as it is.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import count, islice

from .blocks import CPU, SlotRuns
from .config import ConfigError
from .plan import D2H, H2D, LAYER_KV, Copy, LayerStep, SeqWork


def span_gaps(slots: list[int], gap: int) -> list[int]:
    """Sorted `slots` plus the free slots of every gap of at most `gap` between two of them."""
    out = slots[:1]
    for slot in slots[1:]:
        if slot - out[-1] - 1 <= gap:
            out.extend(range(out[-1] + 1, slot))
        out.append(slot)
    return out


def runs(pairs) -> list[tuple[int, int, int]]:
    """(source, destination, length) of the maximal runs of `pairs` whose source and destination both
    step by one: each is one copy call. The executor copies exactly these runs."""
    out: list[list[int]] = []
    for src, dst in pairs:
        if out and src == out[-1][0] + out[-1][2] and dst == out[-1][1] + out[-1][2]:
            out[-1][2] += 1
        else:
            out.append([src, dst, 1])
    return [(src, dst, length) for src, dst, length in out]


@dataclass(frozen=True)
class SwapCopies:
    """What one direction's layer-swap copies move in each layer: runs of CPU slots, [start, end) each and
    one call each (a prefetch's runs span its gaps), and the bytes of one layer of them."""
    runs: tuple[tuple[int, int], ...]
    nbytes: int

    @property
    def calls(self) -> int:
        return len(self.runs)

    @cached_property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        """(CPU slot, staging row) of every block it moves: the same number."""
        return tuple((slot, slot) for start, end in self.runs for slot in range(start, end))


@dataclass(frozen=True)
class LayerSwap:
    """One plan's layer-swap copies, compact. Copy ids are `first_op` on, in issue order: the prologue's,
    then per layer its prefetch and (if any) its write-back. Layer l (l >= L: the next plan's l - L) uses
    staging slot (first_slot + l) mod ring."""
    num_layers: int
    ring: int                                        # staging slots: prefetch depth + 1
    first_op: int
    first_slot: int
    prologue: tuple[tuple[int, SwapCopies], ...]     # (layer, the blocks fetched for it), before layer 0
    carried: tuple[int | None, ...]                  # per layer < depth: the previous plan's prefetch of it to await
    fetch: SwapCopies                                # what each layer prefetches (for the layer depth ahead)
    write: SwapCopies | None                         # what each layer writes back (None: nothing)
    evicted: tuple[int | None, ...]                  # per staging slot: its last write-back before this plan

    @property
    def depth(self) -> int:
        return self.ring - 1

    def slot(self, layer: int) -> int:
        return (self.first_slot + layer) % self.ring

    @property
    def per_layer(self) -> int:
        """Copies issued per layer: a prefetch, and a write-back when anything is written."""
        return 1 if self.write is None else 2

    def fetch_op(self, layer: int) -> int:
        """The id of the prefetch issued when `layer` is reached."""
        return self.first_op + len(self.prologue) + layer * self.per_layer

    def fetch_after(self, layer: int) -> int | None:
        """The write-back the prefetch issued at `layer` follows: the last one out of the slot it fills,
        which is `layer - 1`'s (this plan's, if it writes back) or an earlier plan's."""
        if self.write is not None and layer:
            return self.fetch_op(layer - 1) + 1
        return self.evicted[self.slot(layer + self.depth)]

    def waits(self, layer: int) -> tuple[int, ...]:
        """The copies `layer` waits for: for the first `depth` layers the previous plan's prefetch and the
        prologue's, then the prefetch issued `depth` layers before."""
        if layer >= self.depth:
            return (self.fetch_op(layer - self.depth),)
        carried = self.carried[layer]
        out: tuple[int, ...] = () if carried is None else (carried,)
        for i, (fetched, _) in enumerate(self.prologue):
            if fetched == layer:
                out += (self.first_op + i,)
        return out

    @property
    def copies(self) -> int:
        return len(self.prologue) + self.per_layer * self.num_layers

    def bytes_moved(self) -> tuple[int, int]:
        h2d = sum(c.nbytes for _, c in self.prologue) + self.num_layers * self.fetch.nbytes
        return h2d, 0 if self.write is None else self.num_layers * self.write.nbytes

    def staging_slots(self) -> tuple[int, ...]:
        return tuple(self.slot(layer) for layer in range(self.num_layers))

    def prologue_copies(self) -> tuple[Copy, ...]:
        """The prologue as `Copy` objects (a plan carries them as its `prologue`)."""
        out = []
        for i, (layer, copies) in enumerate(self.prologue):
            after = self.evicted[self.slot(layer)]
            out.append(Copy(self.first_op + i, H2D, LAYER_KV, layer, copies.pairs, copies.nbytes, copies.calls,
                            () if after is None else (after,), self.slot(layer)))
        return tuple(out)

    def steps(self) -> tuple[LayerStep, ...]:
        """Every layer's copies as `Copy` objects with every block's slot pair: the one expansion, for the
        backends that run copies block by block (the executor) or copy by copy (layer_events.py)."""
        L, depth, steps = self.num_layers, self.depth, []
        for layer in range(L):
            op, after = self.fetch_op(layer), self.fetch_after(layer)
            fetch = Copy(op, H2D, LAYER_KV, (layer + depth) % L, self.fetch.pairs, self.fetch.nbytes, self.fetch.calls,
                         () if after is None else (after,), self.slot(layer + depth))
            evict = () if self.write is None else (
                Copy(op + 1, D2H, LAYER_KV, layer, self.write.pairs, self.write.nbytes, self.write.calls, (),
                     self.slot(layer)),)
            steps.append(LayerStep(issue=(fetch,), wait=self.waits(layer), evict=evict))
        return tuple(steps)


class SwapSteps(Sequence):
    """A plan's `layers` when they are a `LayerSwap`'s: the record, expanded into `LayerStep`s when first
    read (the simulator's timeline reads `record` instead)."""

    def __init__(self, record: LayerSwap):
        self.record = record
        self._steps: tuple[LayerStep, ...] | None = None

    def _expanded(self) -> tuple[LayerStep, ...]:
        if self._steps is None:
            self._steps = self.record.steps()
        return self._steps

    def __len__(self) -> int:
        return self.record.num_layers

    def __getitem__(self, index):
        return self._expanded()[index]

    def __iter__(self):
        return iter(self._expanded())

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, (tuple, SwapSteps)) else NotImplemented

    __hash__ = None  # type: ignore[assignment]  # unhashable, Python's way; typeshed has only a method

    def __repr__(self) -> str:
        return f"SwapSteps({self.record!r})"

    def __reduce__(self):
        return SwapSteps, (self.record,)


class FifoLayerSwap:
    def __init__(self, num_layers: int, depth: int, capacity: int, block_bytes_layer: int,
                 block_size: int, dirty_only: bool, op_ids: count, coalesce_gap: int = 0):
        if depth >= num_layers:
            # the prefetch of the next iteration's layer l is issued when this one reaches layer l - depth + L:
            # at depth L, before layer l has computed, so before its write-back of the tokens it adds
            raise ConfigError(f"prefetch depth {depth} must be less than the model's {num_layers} layers (a "
                              f"layer's prefetch for the next iteration must follow its write-back)")
        self.num_layers, self.depth, self.capacity = num_layers, depth, capacity
        self.block_bytes_layer, self.block_size, self.dirty_only = block_bytes_layer, block_size, dirty_only
        self.ring, self.coalesce_gap = self.depth + 1, coalesce_gap
        self._ids = op_ids
        self._first_layer = 0                                 # global index of the next plan's layer 0
        self._evicted: list[int | None] = [None] * self.ring  # staging slot → id of the last write-back out of it
        # What the previous plan prefetched for the next plan's first `depth` layers: the copies' ids and the
        # CPU slots (None: nothing); `_staged_live` when those slots were a live set's (then its journal
        # turns them into the live set now).
        self._carried: tuple[int, ...] | None = None
        self._staged: set[int] | None = None
        self._staged_live = False
        self._made: dict[bool, tuple] = {}                   # fetch? → ((live set, version), its SwapCopies)

    @property
    def staging_bytes(self) -> int:
        """GPU memory the staging area needs: `depth + 1` slots of `capacity` blocks of one layer."""
        return self.ring * self.capacity * self.block_bytes_layer

    def steady(self, live: SlotRuns) -> bool:
        """Whether the next plan of `live` (the tables' CPU blocks in use) would copy as the last one did,
        with no prologue: the last plan was of it and staged its blocks, and it has not changed since."""
        return self._carried is not None and self._staged_live and not live.changed

    def skip(self, iterations: int) -> None:
        """Move the slot rotation on over iterations that hold no CPU block (a decode run, a plan), as `plan`
        would over as many plans with nothing to copy."""
        self._first_layer += iterations * self.num_layers
        self._carried = self._staged = None

    def written(self, seqs: Sequence[SeqWork]) -> list[int]:
        """The CPU slots `seqs` write into this iteration (their new tokens' blocks)."""
        out: list[int] = []
        for seq in seqs:
            first, last = seq.cached_tokens // self.block_size, (seq.cached_tokens + seq.new_tokens - 1) // self.block_size
            out.extend(block.slot for block in seq.blocks[first:last + 1] if block.tier == CPU)
        return out

    def plan_seqs(self, seqs: Sequence[SeqWork]) -> LayerSwap | None:
        """The record of any batch, its CPU blocks and the ones it writes gathered from its block tables."""
        wanted = SlotRuns.of({b.slot for s in seqs for b in s.blocks if b.tier == CPU}, self.coalesce_gap)
        return self.plan(wanted, SlotRuns.of(self.written(seqs)))

    def _swap_copies(self, slots: SlotRuns, fetch: bool) -> SwapCopies:
        """What a prefetch (gaps spanned) or a write-back of `slots` moves; for a live set, made once per
        version of it and reused while the set does not change."""
        key = (slots, slots.version)
        made = self._made.get(fetch)
        if slots.live and made is not None and made[0][0] is slots and made[0][1] == slots.version:
            return made[1]
        copies = (SwapCopies(slots.group_runs(), slots.spanned * self.block_bytes_layer) if fetch
                  else SwapCopies(slots.runs(), slots.count * self.block_bytes_layer))
        if slots.live:
            self._made[fetch] = (key, copies)
        return copies

    def _missing(self, wanted: SlotRuns) -> tuple[list[int], bool]:
        """(the slots of `wanted` the previous plan did not prefetch, sorted; whether it prefetched any of
        them), and `wanted` becomes what this plan prefetches. Following a live set from the plan before,
        only its journal's slots are looked at."""
        changes = wanted.take_changes() if wanted.journal else None  # None: not followed, or lost
        staged = self._staged
        if staged is not None and self._staged_live and changes is not None:
            added = sorted(slot for slot in changes if slot in wanted)
            for slot in changes:
                if slot in wanted:
                    staged.add(slot)
                else:
                    staged.discard(slot)
            return added, wanted.count > len(added)
        now = set(wanted)
        self._staged = now
        if staged is None:
            return sorted(now), False
        return sorted(now - staged), not staged.isdisjoint(now)

    def plan(self, wanted: SlotRuns, written: SlotRuns | None) -> LayerSwap | None:
        """The record of a plan whose batch reads the CPU blocks `wanted` and writes `written` (None: all
        of `wanted`, as without dirty_only); None when nothing is on the CPU. Live sets (the tables') are
        followed from plan to plan, their copies made again only when they change."""
        L, depth = self.num_layers, self.depth
        base, carried = self._first_layer, self._carried
        self._first_layer, self._carried = base + L, None
        if carried is None:
            self._staged = None
        missing, overlaps = self._missing(wanted)
        self._staged_live = wanted.journal
        if not wanted.count:
            self._staged = None
            return None
        fetch = self._swap_copies(wanted, True)
        write: SwapCopies | None
        if written is None or not self.dirty_only:
            write = self._swap_copies(wanted, False)
        else:
            write = self._swap_copies(written, False) if written.count else None
        prologue: tuple[tuple[int, SwapCopies], ...] = ()
        if missing:
            spanned = SlotRuns.of(missing, self.coalesce_gap)
            copies = SwapCopies(spanned.group_runs(), spanned.spanned * self.block_bytes_layer)
            prologue = tuple((layer, copies) for layer in range(depth))
        record = LayerSwap(L, self.ring, next(self._ids), base % self.ring, prologue,
                           carried if carried is not None and overlaps else (None,) * depth, fetch, write,
                           tuple(self._evicted))
        if record.copies > 1:  # draw the record's other ids
            next(islice(self._ids, record.copies - 2, None))
        if write is not None:
            for layer in range(max(0, L - self.ring), L):
                self._evicted[record.slot(layer)] = record.fetch_op(layer) + 1
        self._carried = tuple(record.fetch_op(layer) for layer in range(L - depth, L))
        return record
