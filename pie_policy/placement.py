"""Where a sequence's next KV block goes: the one decision that tells Pie, static offload and vLLM apart.

- `GpuOnly` (vllm, vllm-swap): every live block on the GPU.
- `StaticShare` (static): keep a fixed share of the live blocks on the CPU, whatever the load.
- `Expanding` (pie): the GPU first; the CPU once the GPU is full, up to the share the expansion
  controller currently allows.
Live CPU blocks are also bounded by `cpu_capacity`, the blocks the GPU staging area can hold.
"""
from __future__ import annotations

from .blocks import CPU, GPU, BlockTables
from .expansion import ExpansionController


class GpuOnly:
    live_cpu = False
    gpu_first = True  # a new block goes to the GPU while it has room

    def __init__(self, tables: BlockTables):
        self.tables = tables

    def cpu_room(self, unlimited: bool = False) -> int:
        """Live CPU blocks that could still be placed; `unlimited` ignores a controller's share."""
        return 0

    def available(self, unlimited: bool = False) -> int:
        """Blocks that could still be placed."""
        return self.tables.pools[GPU].num_free + self.cpu_room(unlimited)

    def choose(self) -> str | None:
        """The tier of one more block, or None when there is no room."""
        return GPU if self.tables.pools[GPU].num_free else None

    @property
    def guaranteed(self) -> int:
        """Blocks one sequence can always get when it is alone (bounds what a request may need)."""
        return self.tables.pools[GPU].capacity


class StaticShare(GpuOnly):
    live_cpu = True

    def __init__(self, tables: BlockTables, share: float, cpu_capacity: int):
        super().__init__(tables)
        self.share, self.cpu_capacity = share, cpu_capacity

    def cpu_room(self, unlimited: bool = False) -> int:
        cpu = self.tables.pools[CPU]
        return min(cpu.num_free, self.cpu_capacity - cpu.num_used)

    def choose(self) -> str | None:
        gpu, cpu = self.tables.pools[GPU], self.tables.pools[CPU]
        wants_cpu = cpu.num_used < self.share * (gpu.num_used + cpu.num_used + 1)
        for tier in ((CPU, GPU) if wants_cpu else (GPU, CPU)):
            if (gpu.num_free if tier == GPU else self.cpu_room()) > 0:
                return tier
        return None

    @property
    def guaranteed(self) -> int:
        return self.tables.pools[GPU].capacity + min(self.tables.pools[CPU].capacity, self.cpu_capacity)

    @property
    def gpu_first(self) -> bool:
        return self.share == 0


class Expanding(StaticShare):
    gpu_first = True
    def __init__(self, tables: BlockTables, controller: ExpansionController, cpu_capacity: int):
        GpuOnly.__init__(self, tables)
        self.controller, self.cpu_capacity = controller, cpu_capacity

    def cpu_room(self, unlimited: bool = False) -> int:
        room = super().cpu_room()
        if unlimited:
            return room
        share = self.controller.share  # cpu / (gpu + cpu) <= share with the GPU full
        allowed = int(share / (1 - share) * self.tables.pools[GPU].capacity) - self.tables.pools[CPU].num_used
        return max(0, min(room, allowed))

    def choose(self) -> str | None:
        if self.tables.pools[GPU].num_free:
            return GPU
        return CPU if self.cpu_room() > 0 else None

    @property
    def guaranteed(self) -> int:
        return self.tables.pools[GPU].capacity
