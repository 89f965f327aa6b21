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
"""
from __future__ import annotations

from itertools import count
from typing import Container

from .blocks import CPU
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
    return [tuple(run) for run in out]


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
        self._first_layer = 0                  # global index of the next plan's layer 0
        self._last_evict: dict[int, int] = {}  # staging slot → id of the last write-back reading it
        self._carried: dict[int, tuple[int, frozenset]] = {}  # next plan's layer → (prefetch id, its blocks)

    @property
    def staging_bytes(self) -> int:
        """GPU memory the staging area needs: `depth + 1` slots of `capacity` blocks of one layer."""
        return self.ring * self.capacity * self.block_bytes_layer

    def skip(self, iterations: int) -> None:
        """Move the slot rotation on over iterations that hold no CPU block (a decode run), as `plan`
        would over as many plans with nothing to copy."""
        self._first_layer += iterations * self.num_layers
        self._carried = {}

    def _copies(self, direction: str, slots: list[int]):
        """A maker of this plan's copies of `slots` (pairs and calls worked out once, not per layer)."""
        if direction == H2D:
            slots = span_gaps(slots, self.coalesce_gap)
        pairs = tuple((s, s) for s in slots)
        nbytes, calls = len(slots) * self.block_bytes_layer, len(runs(pairs))

        def make(layer: int, staging: int) -> Copy:
            after = self._last_evict.get(staging) if direction == H2D else None
            return Copy(next(self._ids), direction, LAYER_KV, layer, pairs, nbytes, calls,
                        () if after is None else (after,), staging)
        return make

    def plan(self, seqs: tuple[SeqWork, ...], cpu_holders: Container[int]):
        """(prologue, per-layer steps, staging slot per layer) for a batch; all empty when nothing is on
        the CPU. Only sequences in `cpu_holders` (those with CPU blocks) are scanned."""
        L, depth = self.num_layers, self.depth
        base, carried = self._first_layer, self._carried
        self._first_layer, self._carried = base + L, {}
        cpu_slots, dirty = [], set()
        for seq in seqs:
            if seq.request_id not in cpu_holders:
                continue
            first_dirty = seq.cached_tokens // self.block_size
            last_dirty = (seq.cached_tokens + seq.new_tokens - 1) // self.block_size
            for index, block in enumerate(seq.blocks):
                if block.tier == CPU:
                    cpu_slots.append(block.slot)
                    if first_dirty <= index <= last_dirty:
                        dirty.add(block.slot)
        if not cpu_slots:
            return (), (), ()
        cpu_slots.sort()
        wanted = frozenset(cpu_slots)
        written = [s for s in cpu_slots if s in dirty] if self.dirty_only else cpu_slots
        slot = [(base + layer) % self.ring for layer in range(L + depth)]

        prologue, waits = [], {}
        for layer in range(depth):
            op, staged = carried.get(layer, (None, frozenset()))
            waits[layer] = (op,) if staged & wanted else ()
            missing = sorted(wanted - staged)
            if missing:
                prologue.append(self._copies(H2D, missing)(layer, slot[layer]))
                waits[layer] += (prologue[-1].op_id,)
        prefetch, write_back = self._copies(H2D, cpu_slots), self._copies(D2H, written)
        steps = []
        for layer in range(L):
            ahead = layer + depth
            fetch = prefetch(ahead % L, slot[ahead])
            if ahead < L:
                waits[ahead] = (fetch.op_id,)
            else:
                self._carried[ahead - L] = (fetch.op_id, wanted)
            evict = ()
            if written:
                evict = (write_back(layer, slot[layer]),)
                self._last_evict[slot[layer]] = evict[0].op_id
            steps.append(LayerStep(issue=(fetch,), wait=waits[layer], evict=evict))
        return tuple(prologue), tuple(steps), tuple(slot[:L])
