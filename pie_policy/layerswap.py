"""FIFO layer swapping (Pie's performance-transparent swapping).

Each CPU-resident KV block of the batch is needed on the GPU once per layer. The GPU keeps a staging
area of `depth + 1` slots, each holding one layer's worth of the batch's CPU blocks (at most `capacity`
blocks). Layer l stages into slot l % (depth + 1), and the copies go in this order:

    before layer 0           prefetch layers 0 … depth-1                      (the prologue)
    when layer l is reached  prefetch layer l + depth, then wait for layer l's prefetch
    after layer l computes   write layer l's staged blocks back to the CPU pool (evict)

Slots are reused first-in first-out: the prefetch of layer l + depth lands in the slot layer l - 1 just
left, so it is ordered after that slot's write-back (possibly one from the previous iteration). With
`dirty_only`, only blocks this iteration wrote into (its new tokens) are written back — the CPU copy of
every other block is still valid. Blocks consecutive in both CPU slot and staging position go in one call.
"""
from __future__ import annotations

from itertools import count

from typing import Container

from .blocks import CPU
from .plan import D2H, H2D, LAYER_KV, Copy, LayerStep, SeqWork


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
                 block_size: int, dirty_only: bool, op_ids: count):
        self.num_layers, self.depth, self.capacity = num_layers, min(depth, num_layers), capacity
        self.block_bytes_layer, self.block_size, self.dirty_only = block_bytes_layer, block_size, dirty_only
        self.ring = self.depth + 1
        self._ids = op_ids
        self._last_evict: dict[int, int] = {}  # staging slot → id of the last write-back reading it

    @property
    def staging_bytes(self) -> int:
        """GPU memory the staging area needs: `depth + 1` slots of `capacity` blocks of one layer."""
        return self.ring * self.capacity * self.block_bytes_layer

    def plan(self, seqs: tuple[SeqWork, ...], cpu_holders: Container[int]):
        """(prologue, per-layer steps, staging positions) for a batch; all empty when nothing is on the CPU.
        Only sequences in `cpu_holders` (those with CPU blocks) are scanned."""
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
        if len(cpu_slots) > self.capacity:
            raise RuntimeError(f"{len(cpu_slots)} CPU blocks in the batch exceed the staging capacity {self.capacity}")
        positions = {slot: p for p, slot in enumerate(cpu_slots)}
        fetch_pairs = tuple((s, positions[s]) for s in cpu_slots)
        fetch_calls = len(runs(fetch_pairs))
        written = [s for s in cpu_slots if s in dirty] if self.dirty_only else cpu_slots
        evict_pairs = tuple((positions[s], s) for s in written)

        def prefetch(layer: int) -> Copy:
            after = self._last_evict.get(layer % self.ring)
            return Copy(next(self._ids), H2D, LAYER_KV, layer, fetch_pairs,
                        len(cpu_slots) * self.block_bytes_layer, fetch_calls, () if after is None else (after,))

        fetched = {layer: prefetch(layer) for layer in range(self.depth)}
        steps = []
        for layer in range(self.num_layers):
            issue = ()
            if layer + self.depth < self.num_layers:
                fetched[layer + self.depth] = prefetch(layer + self.depth)
                issue = (fetched[layer + self.depth],)
            evict = ()
            if written:
                evict = (Copy(next(self._ids), D2H, LAYER_KV, layer, evict_pairs,
                              len(written) * self.block_bytes_layer, len(runs(evict_pairs))),)
                self._last_evict[layer % self.ring] = evict[0].op_id
            steps.append(LayerStep(issue=issue, wait=(fetched[layer].op_id,), evict=evict))
        prologue = tuple(fetched[layer] for layer in range(self.depth))
        return prologue, tuple(steps), tuple(positions.items())
