"""Where a sequence's new KV blocks go: the one decision that tells Pie, static offload and vLLM apart.

The scheduler asks `place(blocks, full, admitting)` for a step's new blocks, `full` of which (the first
ones) the step fills completely and are read-only from then on; the answer is (tier, count) runs in
table order, or None when they do not fit (an admission also keeps `watermark` GPU blocks free).

- `GpuOnly` (vllm, vllm-swap): every live block on the GPU.
- `StaticShare` (static): keep a fixed share of the live blocks on the CPU, whatever the load.
- `Expanding` (pie; pie-fixed, whose share is a `HeldShare`): the GPU first. An admission the GPU
  cannot take whole keeps its full blocks in CPU
  memory, up to the share the expansion controller allows, and its partial tail on the GPU. By role,
  because a copy call costs a fixed latency (8 µs on GH200, ~9 block-layers' worth of bytes): full
  prompt blocks are read-only, allocated together (consecutive CPU slots: one call per layer) and never
  written back, whereas a growing tail block on the CPU would be read and written back every layer of
  every iteration, one call each. A running sequence whose block the GPU cannot take gets it on the
  CPU within the share, else preemption (letting it past the share traded preemptions for dirty tails'
  stalls and lost, bench/RESULTS.md). After a cut below what the CPU holds, admissions that fit the GPU
  go on (their compute hides the CPU KV's copies; stopping them shrank the batch around the CPU KV until
  the link stalled) and the CPU KV drains as its sequences finish.
Live CPU blocks are also bounded by `cpu_capacity`, the blocks the GPU staging area can hold.
"""
from __future__ import annotations

from .blocks import CPU, GPU, BlockTables
from .expansion import ExpansionController


class HeldShare:
    """A share no controller moves: `Expanding` at a fixed share (pie-fixed)."""

    def __init__(self, share: float):
        self.share = share


class GpuOnly:
    """The placement interface (what the scheduler asks) and its simplest rule: everything on the GPU."""
    live_cpu = False  # whether its CPU blocks are live KV (then the policy plans layer swapping)
    gpu_first = True  # a new block goes to the GPU while it has room
    controller: ExpansionController | HeldShare | None = None  # what sets its share, if anything

    def __init__(self, tables: BlockTables, watermark: int = 0):
        self.tables, self.watermark = tables, watermark

    def cpu_room(self, unlimited: bool = False) -> int:
        """Live CPU blocks that could still be placed; `unlimited` ignores a controller's share."""
        return 0

    def available(self, unlimited: bool = False) -> int:
        """Blocks that could still be placed."""
        return self.tables.pools[GPU].num_free + self.cpu_room(unlimited)

    def place(self, blocks: int, full: int = 0, admitting: bool = False,
              unlimited: bool = False) -> list[tuple[str, int]] | None:
        """(tier, count) runs for `blocks` new blocks in table order, or None when they do not fit."""
        keep = self.watermark if admitting else 0
        return [(GPU, blocks)] if self.tables.pools[GPU].num_free - blocks >= keep else None

    @property
    def guaranteed(self) -> int:
        """Blocks one sequence can always get when it is alone (bounds what a request may need)."""
        return self.tables.pools[GPU].capacity


class LiveCpu(GpuOnly):
    """A placement whose CPU blocks are live KV (streamed in by layer swapping), at most `cpu_capacity` of
    them: what the GPU staging area holds."""
    live_cpu = True

    def __init__(self, tables: BlockTables, watermark: int, cpu_capacity: int):
        super().__init__(tables, watermark)
        self.cpu_capacity = cpu_capacity

    def cpu_room(self, unlimited: bool = False) -> int:
        cpu = self.tables.pools[CPU]
        return min(cpu.num_free, self.cpu_capacity - cpu.num_used)


class StaticShare(LiveCpu):
    def __init__(self, tables: BlockTables, watermark: int, share: float, cpu_capacity: int):
        super().__init__(tables, watermark, cpu_capacity)
        self.share = share

    def place(self, blocks, full=0, admitting=False, unlimited=False):
        """Block by block, the CPU while it holds less than `share` of the live blocks."""
        if self.available() - blocks < (self.watermark if admitting else 0):
            return None
        gpu, cpu = self.tables.pools[GPU].num_free, self.cpu_room()
        used_gpu, used_cpu, out = self.tables.pools[GPU].num_used, self.tables.pools[CPU].num_used, []
        for _ in range(blocks):
            wants_cpu = used_cpu < self.share * (used_gpu + used_cpu + 1)
            tier = CPU if (wants_cpu and cpu) or not gpu else GPU
            gpu, cpu = gpu - (tier == GPU), cpu - (tier == CPU)
            used_gpu, used_cpu = used_gpu + (tier == GPU), used_cpu + (tier == CPU)
            if out and out[-1][0] == tier:
                out[-1] = (tier, out[-1][1] + 1)
            else:
                out.append((tier, 1))
        return out

    @property
    def guaranteed(self) -> int:
        return self.tables.pools[GPU].capacity + min(self.tables.pools[CPU].capacity, self.cpu_capacity)

    @property
    def gpu_first(self) -> bool:
        return self.share == 0


class Expanding(StaticShare):
    gpu_first = True

    def __init__(self, tables: BlockTables, watermark: int, controller: ExpansionController | HeldShare,
                 cpu_capacity: int):
        LiveCpu.__init__(self, tables, watermark, cpu_capacity)
        self.controller = controller

    def cpu_room(self, unlimited: bool = False) -> int:
        room = super().cpu_room()
        if unlimited:
            return room
        return max(0, min(room, self.allowed - self.tables.pools[CPU].num_used))

    @property
    def allowed(self) -> int:
        """CPU blocks the share allows: cpu / (gpu + cpu) <= share with the GPU full."""
        share = self.controller.share
        return int(share / (1 - share) * self.tables.pools[GPU].capacity)

    def place(self, blocks, full=0, admitting=False, unlimited=False):
        """All on the GPU while they fit it (an admission keeping the watermark); else an admission puts
        its full blocks on the CPU and the rest on the GPU, a running sequence its full blocks and as many
        more as the GPU lacks room for; the CPU blocks within the share unless `unlimited`."""
        free = self.tables.pools[GPU].num_free
        keep = self.watermark if admitting else 0
        if free - blocks >= keep:
            return [(GPU, blocks)]
        on_cpu = full if admitting else max(full, blocks - free)
        if on_cpu == 0 or on_cpu > self.cpu_room(unlimited) or free - (blocks - on_cpu) < keep:
            return None
        return [(CPU, on_cpu), (GPU, blocks - on_cpu)]

    @property
    def guaranteed(self) -> int:
        return self.tables.pools[GPU].capacity
