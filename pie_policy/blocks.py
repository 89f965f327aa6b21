"""Block tables: each logical KV block of each sequence maps to a tier (GPU or CPU) and a slot.

Allocators hand out the lowest free slot first, so a sequence's blocks tend to be contiguous and copies
of them take few calls. Accounting is exact: a slot is free or owned by one sequence, never both.

What layer swapping copies is kept as runs of consecutive CPU slots (`SlotRuns`), updated as blocks are
allocated and freed: every CPU block in use (what a whole batch prefetches) and every sequence's last
block where it lies on the CPU (what a batch of decodes writes back). A plan reads its copies' calls and
bytes off them instead of rebuilding them from the blocks.
"""
from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Iterable
from typing import NamedTuple

GPU, CPU = "gpu", "cpu"


class BlockRef(NamedTuple):
    tier: str
    slot: int


class SlotRuns:
    """A set of slots as its maximal runs of consecutive slots, [start, end) each, kept sorted as slots come
    and go (O(log runs) a slot). With `gap`, runs less than `gap` + 1 free slots apart are bridged into one
    group, as a prefetch spans small gaps (layerswap.py): `groups` is then its calls and `spanned` the slots
    it moves, gaps included. `version` changes whenever the set does. A `live` set is one its owner keeps
    changing in place (the tables'); with `journal`, it also lists the slots that came or went since its
    reader last took them (`take_changes`), so that a reader can follow it in O(changes)."""

    def __init__(self, gap: int = 0, live: bool = False, journal: bool = False):
        self.gap, self.live = gap, live
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.count = 0           # slots in the set
        self._bridged = 0        # gaps of at most `gap` free slots between two runs
        self._bridged_slots = 0  # the free slots in them
        self.version = 0
        self._changes: list[int] | None = [] if journal else None
        self._lost = False       # the journal grew past its bound unread: the reader must look at everything

    @property
    def journal(self) -> bool:
        return self._changes is not None

    @property
    def changed(self) -> bool:
        """Whether anything came or went since the journal was last read (True without a journal)."""
        return self._changes is None or bool(self._changes) or self._lost

    def take_changes(self) -> set[int] | None:
        """The slots whose membership changed since the last call (a slot that came and went is not one),
        or None when more changed than the journal keeps."""
        changes, self._changes, lost, self._lost = self._changes, [], self._lost, False
        if lost:
            return None
        assert changes is not None  # only a journal's reader takes its changes
        toggled: set[int] = set()
        for slot in changes:
            if slot in toggled:
                toggled.remove(slot)
            else:
                toggled.add(slot)
        return toggled

    @classmethod
    def of(cls, slots: Iterable[int], gap: int = 0) -> "SlotRuns":
        """The runs of `slots` (distinct), in one pass over them sorted."""
        runs, ordered = cls(gap), sorted(slots)
        if len(set(ordered)) != len(ordered):
            raise ValueError("a slot appears twice")
        starts, ends = runs.starts, runs.ends
        for slot in ordered:
            if ends and ends[-1] == slot:
                ends[-1] = slot + 1
            else:
                if ends:
                    runs._gap(slot - ends[-1], +1)
                starts.append(slot)
                ends.append(slot + 1)
        runs.count = len(ordered)
        return runs

    @property
    def groups(self) -> int:
        return len(self.starts) - self._bridged

    @property
    def spanned(self) -> int:
        return self.count + self._bridged_slots

    def __contains__(self, slot: int) -> bool:
        i = bisect_right(self.starts, slot) - 1
        return i >= 0 and slot < self.ends[i]

    def __iter__(self):
        for start, end in zip(self.starts, self.ends):
            yield from range(start, end)

    def runs(self) -> tuple[tuple[int, int], ...]:
        """The runs, (start, end) each, in slot order."""
        return tuple(zip(self.starts, self.ends))

    def group_runs(self) -> tuple[tuple[int, int], ...]:
        """The groups (runs with the gaps of at most `gap` between them bridged), (start, end) each."""
        out: list[list[int]] = []
        for start, end in zip(self.starts, self.ends):
            if out and start - out[-1][1] <= self.gap:
                out[-1][1] = end
            else:
                out.append([start, end])
        return tuple((start, end) for start, end in out)

    def _gap(self, size: int, sign: int) -> None:
        """Count a gap of `size` free slots between two runs in (+1) or out (-1)."""
        if size <= self.gap:
            self._bridged += sign
            self._bridged_slots += sign * size

    def add(self, slot: int) -> None:
        starts, ends = self.starts, self.ends
        i = bisect_right(starts, slot)  # runs[:i] start at or before the slot
        if i and slot < ends[i - 1]:
            raise ValueError(f"slot {slot} is already in the set")
        joins_left = i > 0 and ends[i - 1] == slot
        joins_right = i < len(starts) and starts[i] == slot + 1
        if i and i < len(starts):
            self._gap(starts[i] - ends[i - 1], -1)
        if joins_left and joins_right:
            ends[i - 1] = ends[i]
            del starts[i], ends[i]
        elif joins_left:
            ends[i - 1] = slot + 1
            if i < len(starts):
                self._gap(starts[i] - slot - 1, +1)
        elif joins_right:
            starts[i] = slot
            if i:
                self._gap(slot - ends[i - 1], +1)
        else:
            starts.insert(i, slot)
            ends.insert(i, slot + 1)
            if i:
                self._gap(slot - ends[i - 1], +1)
            if i + 1 < len(starts):
                self._gap(starts[i + 1] - slot - 1, +1)
        self.count += 1
        self.version += 1
        if self._changes is not None:
            self._note(slot)

    def remove(self, slot: int) -> None:
        starts, ends = self.starts, self.ends
        i = bisect_right(starts, slot) - 1
        if i < 0 or slot >= ends[i]:
            raise ValueError(f"slot {slot} is not in the set")
        start, end = starts[i], ends[i]
        has_left, has_right = i > 0, i + 1 < len(starts)
        if end - start == 1:  # the run goes: its gaps on either side become one
            if has_left:
                self._gap(start - ends[i - 1], -1)
            if has_right:
                self._gap(starts[i + 1] - end, -1)
            if has_left and has_right:
                self._gap(starts[i + 1] - ends[i - 1], +1)
            del starts[i], ends[i]
        elif slot == start:
            starts[i] = slot + 1
            if has_left:
                self._gap(start - ends[i - 1], -1)
                self._gap(start + 1 - ends[i - 1], +1)
        elif slot == end - 1:
            ends[i] = slot
            if has_right:
                self._gap(starts[i + 1] - end, -1)
                self._gap(starts[i + 1] - slot, +1)
        else:  # split in two around a gap of one slot
            starts.insert(i + 1, slot + 1)
            ends.insert(i, slot)
            self._gap(1, +1)
        self.count -= 1
        self.version += 1
        if self._changes is not None:
            self._note(slot)

    def _note(self, slot: int) -> None:
        """Journal a change; past a bound of a few times the set's size, forget them all (`_lost`)."""
        assert self._changes is not None  # called only with a journal
        if not self._lost:
            self._changes.append(slot)
            if len(self._changes) > 64 + 4 * self.count:
                self._changes, self._lost = [], True


class BlockAllocator:
    """One tier's slots, handed out in bulk as shared `BlockRef`s made once per slot (a long simulated run
    allocates millions). `lowest_first` hands out the lowest free slots (a heap): the CPU pool needs it,
    since copies of consecutive CPU slots go in one call, and keeps its slots in use as runs (`in_use`).
    GPU slots are all alike, so the GPU pool reuses the most recently freed (a stack, O(1) per block in C)."""

    def __init__(self, tier: str, capacity: int, lowest_first: bool, gap: int = 0, journal: bool = False):
        self.tier, self.capacity, self.lowest_first = tier, capacity, lowest_first
        self._refs = [BlockRef(tier, slot) for slot in range(capacity)]
        self._free = list(range(capacity)) if lowest_first else list(range(capacity - 1, -1, -1))
        self._used: set[int] = set()
        self.in_use = SlotRuns(gap, live=True, journal=journal) if lowest_first else None

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
            assert self.in_use is not None  # a lowest-first pool keeps its slots in use as runs
            slots = [heapq.heappop(self._free) for _ in range(count)]
            for slot in slots:
                self.in_use.add(slot)
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
            assert self.in_use is not None  # a lowest-first pool keeps its slots in use as runs
            for slot in slots:
                heapq.heappush(self._free, slot)
                self.in_use.remove(slot)
        else:
            self._free.extend(reversed(slots))  # a sequence freed whole is handed out again in its order


class BlockTables:
    """Every sequence's block table over one GPU and one CPU allocator, with the CPU slots of the tables'
    last blocks as runs (`cpu_tails`: what decodes write). `gap`: the CPU runs' bridged gap (a prefetch's);
    `journal`: whether the CPU runs list their changes for a reader (layer swapping's planner)."""

    def __init__(self, num_gpu_blocks: int, num_cpu_blocks: int, gap: int = 0, journal: bool = False):
        self.pools = {GPU: BlockAllocator(GPU, num_gpu_blocks, lowest_first=False),
                      CPU: BlockAllocator(CPU, num_cpu_blocks, lowest_first=True, gap=gap, journal=journal)}
        self.tables: dict[int, list[BlockRef]] = {}
        self._on_cpu: dict[int, int] = {}  # seq → how many of its blocks are on the CPU, when any
        self.cpu_tails = SlotRuns(live=True)

    def table(self, seq: int) -> list[BlockRef]:
        return self.tables.get(seq, [])

    def count(self, seq: int, tier: str) -> int:
        on_cpu = self._on_cpu.get(seq, 0)
        return on_cpu if tier == CPU else len(self.table(seq)) - on_cpu

    def _untail(self, table: list[BlockRef]) -> None:
        if table and table[-1].tier == CPU:
            self.cpu_tails.remove(table[-1].slot)

    def _tail(self, table: list[BlockRef]) -> None:
        if table and table[-1].tier == CPU:
            self.cpu_tails.add(table[-1].slot)

    def extend(self, seq: int, tier: str, blocks: list[BlockRef]) -> None:
        """Append blocks allocated on `tier` to `seq`'s table."""
        if not blocks:
            self.tables.setdefault(seq, [])
            return
        table = self.tables.setdefault(seq, [])
        if table and table[-1].tier == CPU:  # `_untail` and `_tail`, written out: this runs for every new block
            self.cpu_tails.remove(table[-1].slot)
        table.extend(blocks)
        if blocks[-1].tier == CPU:
            self.cpu_tails.add(blocks[-1].slot)
        if tier == CPU:
            self._on_cpu[seq] = self._on_cpu.get(seq, 0) + len(blocks)

    def append(self, seq: int, tier: str, count: int = 1) -> None:
        """Allocate `count` blocks on `tier` at the end of `seq`'s table."""
        self.extend(seq, tier, self.pools[tier].allocate(count))

    def free(self, seq: int) -> None:
        table = self.tables.pop(seq, [])
        self._untail(table)
        if self._on_cpu.pop(seq, 0):
            for tier in (GPU, CPU):
                self.pools[tier].free([block.slot for block in table if block.tier == tier])
        else:
            self.pools[GPU].free([block.slot for block in table])

    def move(self, seq: int, src: str, dst: str) -> list[tuple[int, int]]:
        """Move all of `seq`'s `src` blocks to `dst` (whole-sequence swap); returns (src, dst) slot pairs. The
        table is replaced, not changed in place: a table only grows at its end (a plan keeps its list)."""
        table = self.tables[seq] = list(self.tables[seq])
        self._untail(table)
        moving = [i for i, block in enumerate(table) if block.tier == src]
        pairs = []
        for i, block in zip(moving, self.pools[dst].allocate(len(moving))):
            pairs.append((table[i].slot, block.slot))
            table[i] = block
        self.pools[src].free([source for source, _ in pairs])
        self._tail(table)
        if dst == CPU:
            self._on_cpu[seq] = len(table)
        else:
            self._on_cpu.pop(seq, None)
        return pairs

    @property
    def cpu_holders(self):
        """The sequences that have at least one block on the CPU (a live view)."""
        return self._on_cpu.keys()
