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
    """One tier's slots, handed out in bulk as shared `BlockRef`s made once per slot (a long simulated run
    allocates millions). `lowest_first` hands out the lowest free slots (a heap): the CPU pool needs it,
    since copies of consecutive CPU slots go in one call. GPU slots are all alike, so the GPU pool reuses
    the most recently freed (a stack, O(1) per block in C)."""

    def __init__(self, tier: str, capacity: int, lowest_first: bool):
        self.tier, self.capacity, self.lowest_first = tier, capacity, lowest_first
        self._refs = [BlockRef(tier, slot) for slot in range(capacity)]
        self._free = list(range(capacity)) if lowest_first else list(range(capacity - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, count: int) -> list[BlockRef]:
        if count > len(self._free):
            raise RuntimeError(f"{count} {self.tier} blocks wanted, {len(self._free)} free (capacity {self.capacity})")
        if self.lowest_first:
            slots = [heapq.heappop(self._free) for _ in range(count)]
        else:
            rest = len(self._free) - count
            slots = self._free[rest:][::-1]
            del self._free[rest:]
        self._used.update(slots)
        return [self._refs[slot] for slot in slots]

    def free(self, slots: list[int]) -> None:
        if not self._used.issuperset(slots):
            raise RuntimeError(f"{self.tier} blocks {sorted(set(slots) - self._used)} freed but not in use")
        self._used.difference_update(slots)
        if self.lowest_first:
            for slot in slots:
                heapq.heappush(self._free, slot)
        else:
            self._free.extend(reversed(slots))  # a sequence freed whole is handed out again in its order


class BlockTables:
    """Every sequence's block table over one GPU and one CPU allocator."""

    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int):
        self.pools = {GPU: BlockAllocator(GPU, num_gpu_blocks, lowest_first=False),
                      CPU: BlockAllocator(CPU, num_cpu_blocks, lowest_first=True)}
        self.tables: dict[int, list[BlockRef]] = {}
        self._on_cpu: dict[int, int] = {}  # seq → how many of its blocks are on the CPU, when any

    def table(self, seq: int) -> list[BlockRef]:
        return self.tables.get(seq, [])

    def count(self, seq: int, tier: str) -> int:
        on_cpu = self._on_cpu.get(seq, 0)
        return on_cpu if tier == CPU else len(self.table(seq)) - on_cpu

    def extend(self, seq: int, tier: str, blocks: list[BlockRef]) -> None:
        """Append blocks allocated on `tier` to `seq`'s table."""
        self.tables.setdefault(seq, []).extend(blocks)
        if tier == CPU and blocks:
            self._on_cpu[seq] = self._on_cpu.get(seq, 0) + len(blocks)

    def append(self, seq: int, tier: str, count: int = 1) -> None:
        """Allocate `count` blocks on `tier` at the end of `seq`'s table."""
        self.extend(seq, tier, self.pools[tier].allocate(count))

    def free(self, seq: int) -> None:
        table = self.tables.pop(seq, [])
        if self._on_cpu.pop(seq, 0):
            for tier in (GPU, CPU):
                self.pools[tier].free([block.slot for block in table if block.tier == tier])
        else:
            self.pools[GPU].free([block.slot for block in table])

    def move(self, seq: int, src: str, dst: str) -> list[tuple[int, int]]:
        """Move all of `seq`'s `src` blocks to `dst` (whole-sequence swap); returns (src, dst) slot pairs."""
        table = self.tables[seq]
        moving = [i for i, block in enumerate(table) if block.tier == src]
        pairs = []
        for i, block in zip(moving, self.pools[dst].allocate(len(moving))):
            pairs.append((table[i].slot, block.slot))
            table[i] = block
        self.pools[src].free([source for source, _ in pairs])
        if dst == CPU:
            self._on_cpu[seq] = len(table)
        else:
            self._on_cpu.pop(seq, None)
        return pairs

    @property
    def cpu_holders(self):
        """The sequences that have at least one block on the CPU (a live view)."""
        return self._on_cpu.keys()
