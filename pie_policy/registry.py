"""Every policy by name: what it does, which backends run it, and how it is built.

Single-engine policies (`Policy`, policies.py) differ only in their placement: where a sequence's new KV
blocks go (placement.py). A new one is a placement in a file of its own plus one `PolicyEntry` below; it
then runs in the simulator and in the executor alike, sized by `sizing.build_policy` (simulator) and
`sizing.engine_config` (executor). FlexGen and the pipeline policies have classes of their own and plans
the executor cannot run (weights and activations copies; several GPUs), so they are simulator-only.

| name           | live KV on            | when out of blocks           | CPU traffic                       | backends   |
|----------------|-----------------------|------------------------------|-----------------------------------|------------|
| vllm           | GPU                   | preempt, recompute           | none                              | sim, exec  |
| vllm-swap      | GPU                   | preempt, swap blocks to CPU  | whole blocks before the iteration | sim, exec  |
| static         | GPU + fixed CPU share | preempt, recompute           | FIFO layer swapping               | sim, exec  |
| pie            | GPU + adaptive share  | preempt, recompute           | FIFO layer swapping               | sim, exec  |
| pie-fixed      | GPU + fixed share     | preempt, recompute           | FIFO layer swapping               | sim, exec  |
| prompt-offload | prompts on the CPU    | preempt, recompute           | FIFO layer swapping               | sim, exec  |
| flexgen        | GPU/CPU/disk (LP)     | none: fixed offline blocks   | weights, KV, activations per layer| sim        |
| pp-vllm        | every GPU's HBM       | preempt, recompute           | none (activations between GPUs)   | sim        |
| pipemax        | HBM + streamed CPU KV | preempt, recompute           | streamed groups per stage         | sim        |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .blocks import BlockTables
from .config import ConfigError, EngineConfig, check_share
from .expansion import ExpansionController
from .placement import Expanding, GpuOnly, HeldShare, StaticShare
from .prompt_offload import PromptOffload

SIM, EXEC = "sim", "exec"
ENGINE, FLEXGEN, PIPELINE = "engine", "flexgen", "pipeline"
# What an engine policy's CPU pool holds: nothing, whole preempted sequences (swap space), or live KV that
# layer swapping streams in every iteration (the staging area is sized for it).
NO_CPU, SWAP_SPACE, LIVE_KV = "none", "swap", "live"

# (tables, config, share, controller) → the placement of an engine policy
PlacementMaker = Callable[[BlockTables, EngineConfig, float, "ExpansionController | None"], GpuOnly]


@dataclass(frozen=True)
class PolicyEntry:
    name: str
    summary: str
    backends: tuple[str, ...]
    family: str = ENGINE
    cpu_blocks: str = NO_CPU
    default_share: float = 0.0       # the CPU share when none is given: static's, pie's largest, the most the
                                     # staging area is sized for (prompt-offload)
    adaptive: bool = False           # the share is the most an online controller may reach (pie)
    placement: PlacementMaker | None = None

    @property
    def swap_preemption(self) -> bool:
        return self.cpu_blocks == SWAP_SPACE


def _gpu_only(tables, config, share, controller):
    return GpuOnly(tables, config.watermark_blocks)


def _static(tables, config, share, controller):
    return StaticShare(tables, config.watermark_blocks, check_share("cpu_share", share), config.num_cpu_blocks)


def _expanding(tables, config, share, controller):
    return Expanding(tables, config.watermark_blocks, controller or ExpansionController(), config.num_cpu_blocks)


def _held(tables, config, share, controller):
    return Expanding(tables, config.watermark_blocks, HeldShare(check_share("cpu_share", share)),
                     config.num_cpu_blocks)


def _prompt_offload(tables, config, share, controller):
    return PromptOffload(tables, config.watermark_blocks, config.num_cpu_blocks)


REGISTRY: dict[str, PolicyEntry] = {entry.name: entry for entry in (
    PolicyEntry("vllm", "vLLM: KV on the GPU only, preemption by recompute", (SIM, EXEC), placement=_gpu_only),
    PolicyEntry("vllm-swap", "vLLM with a CPU swap space: preempted sequences' blocks swapped out and back",
                (SIM, EXEC), cpu_blocks=SWAP_SPACE, placement=_gpu_only),
    PolicyEntry("static", "a fixed share of the live KV in CPU memory, streamed in layer by layer",
                (SIM, EXEC), cpu_blocks=LIVE_KV, default_share=0.2, placement=_static),
    PolicyEntry("pie", "Pie: layer swapping with the CPU share grown and cut online by adaptive expansion",
                (SIM, EXEC), cpu_blocks=LIVE_KV, default_share=0.5, adaptive=True, placement=_expanding),
    PolicyEntry("pie-fixed", "Pie's placement with the CPU share held fixed: what the adaptive share is "
                "measured against", (SIM, EXEC), cpu_blocks=LIVE_KV, default_share=0.1, placement=_held),
    PolicyEntry("prompt-offload", "every admitted prompt's full blocks in CPU memory, the rest on the GPU",
                (SIM, EXEC), cpu_blocks=LIVE_KV, default_share=0.5, placement=_prompt_offload),
    PolicyEntry("flexgen", "FlexGen: offline LP placement over GPU/CPU/disk, large fixed blocks, zig-zag",
                (SIM,), family=FLEXGEN),
    PolicyEntry("pp-vllm", "pipeline parallelism over the server's GPUs, vLLM's virtual engines",
                (SIM,), family=PIPELINE),
    PolicyEntry("pipemax", "pipeline parallelism with the KV HBM cannot hold streamed from CPU memory",
                (SIM,), family=PIPELINE),
)}


def names(family: str | None = None, backend: str | None = None) -> tuple[str, ...]:
    """Registered policy names in registration order, of `family` and run by `backend` when given."""
    return tuple(name for name, e in REGISTRY.items()
                 if (family is None or e.family == family) and (backend is None or backend in e.backends))


def entry(name: str, backend: str | None = None) -> PolicyEntry:
    """The entry of `name`; refuses an unknown name, or one `backend` cannot run, naming the known ones."""
    known = names(backend=backend)
    if name in REGISTRY and name not in known:
        raise ConfigError(f"policy '{name}' runs in the simulator only; the executor runs {', '.join(known)}")
    if name not in known:
        raise ConfigError(f"unknown policy '{name}' (known: {', '.join(known)})")
    return REGISTRY[name]
