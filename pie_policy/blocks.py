"""Block tables: each logical KV block of each sequence maps to a tier (GPU or CPU) and a slot.

Allocators hand out the lowest free slot first, so a sequence's blocks tend to be contiguous and copies
of them take few calls. Accounting is exact: a slot is free or owned by one sequence, never both.
"""
from __future__ import annotations

import heapq
from typing import NamedTuple

GPU, CPU = "gpu", "cpu"


class BlockRef(NamedTuple):
    tier: str
    slot: int


class BlockAllocator:
    def __init__(self, tier: str, capacity: int):
        self.tier, self.capacity = tier, capacity
        self._free = list(range(capacity))  # already a heap
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"no free {self.tier} block (capacity {self.capacity})")
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise RuntimeError(f"{self.tier} block {slot} freed but not in use")
        self._used.remove(slot)
        heapq.heappush(self._free, slot)


class BlockTables:
    """Every sequence's block table over one GPU and one CPU allocator."""

    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int):
        self.pools = {GPU: BlockAllocator(GPU, num_gpu_blocks), CPU: BlockAllocator(CPU, num_cpu_blocks)}
        self.tables: dict[int, list[BlockRef]] = {}
        self._on_cpu: dict[int, int] = {}  # seq → how many of its blocks are on the CPU, when any

    def table(self, seq: int) -> list[BlockRef]:
        return self.tables.get(seq, [])

    def count(self, seq: int, tier: str) -> int:
        on_cpu = self._on_cpu.get(seq, 0)
        return on_cpu if tier == CPU else len(self.table(seq)) - on_cpu

    def append(self, seq: int, tier: str) -> BlockRef:
        block = BlockRef(tier, self.pools[tier].allocate())
        self.tables.setdefault(seq, []).append(block)
        if tier == CPU:
            self._on_cpu[seq] = self._on_cpu.get(seq, 0) + 1
        return block

    def free(self, seq: int) -> None:
        for block in self.tables.pop(seq, []):
            self.pools[block.tier].free(block.slot)
        self._on_cpu.pop(seq, None)

    def move(self, seq: int, src: str, dst: str) -> list[tuple[int, int]]:
        """Move all of `seq`'s `src` blocks to `dst` (whole-sequence swap); returns (src, dst) slot pairs."""
        pairs, table = [], self.tables[seq]
        for i, block in enumerate(table):
            if block.tier == src:
                table[i] = BlockRef(dst, self.pools[dst].allocate())
                self.pools[src].free(block.slot)
                pairs.append((block.slot, table[i].slot))
        if dst == CPU:
            self._on_cpu[seq] = len(table)
        else:
            self._on_cpu.pop(seq, None)
        return pairs

    @property
    def cpu_holders(self):
        """The sequences that have at least one block on the CPU (a live view)."""
        return self._on_cpu.keys()
