"""prompt-offload: every admitted prompt's full KV blocks live in CPU memory, everything written on the GPU.

A prompt's full blocks are read-only once its prefill has written them (a decode never writes them
again), so in CPU memory they cost one host→device copy per layer and iteration and never a write-back;
the growing tail blocks, written every iteration, stay on the GPU. Unlike pie it does not wait for the GPU
to fill before it offloads, and unlike static it offloads by role, not by share: a fixed rule that needs
no controller. Full blocks go to the CPU while the CPU pool (bounded by the staging area) has room, else to
the GPU; a step whose GPU blocks do not fit is refused (the scheduler preempts by recompute).
"""
from __future__ import annotations

from .blocks import CPU, GPU
from .placement import LiveCpu


class PromptOffload(LiveCpu):
    gpu_first = False   # a full block goes to the CPU even while the GPU has room

    def place(self, blocks, full=0, admitting=False, unlimited=False):
        """The step's `full` blocks on the CPU as far as it has room, the rest on the GPU."""
        on_cpu = min(full, self.cpu_room())
        if self.tables.pools[GPU].num_free - (blocks - on_cpu) < (self.watermark if admitting else 0):
            return None
        return [(tier, count) for tier, count in ((CPU, on_cpu), (GPU, blocks - on_cpu)) if count]
