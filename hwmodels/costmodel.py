"""Cost model shared by the simulator and the policies: how long things take and what fits.

Compute comes from the best source the hardware entry has: a calibrated `[fit]` (profile.py), measured
operator times in Vidur's format (`[profile]`: measured.py, the roofline where it has no measurements),
or the roofline alone (roofline.py). With tensor parallelism over `tp` GPUs, compute is one GPU's share
of each layer plus its all-reduces, and memory and the link to CPU memory are the tp GPUs' together
(tensor_parallel.py). A copy costs a fixed latency per call plus its bytes at the direction's bandwidth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .batch import BatchShape
from .hardware import HardwareSpec
from .measured import MeasuredLayers
from .models import ModelSpec
from .roofline import Roofline
from .tensor_parallel import check_tensor_parallel, tp_view
from .vidur import load_profile

DIRECTIONS = ("h2d", "d2h")


class CapacityError(ValueError):
    """The model (or a request) does not fit in the memory the configuration allows."""


@dataclass(frozen=True)
class MemoryBudget:
    """How the engine's HBM is spent, in bytes, over its `gpus` GPUs together (each holds 1/gpus of each
    part). The KV pool gets what the rest leaves."""
    usable_bytes: int
    weight_bytes: int
    activation_bytes: int
    staging_bytes: int
    kv_pool_bytes: int
    gpus: int = 1

    def kv_blocks(self, block_bytes: int) -> int:
        """Whole KV blocks (all layers of `block_tokens` tokens) that fit in the pool."""
        return self.kv_pool_bytes // block_bytes

    def per_gpu(self) -> "MemoryBudget":
        """One GPU's share of each part."""
        n = self.gpus
        return MemoryBudget(self.usable_bytes // n, self.weight_bytes // n, self.activation_bytes // n,
                            self.staging_bytes // n, self.kv_pool_bytes // n)


class CostModel:
    """What a system does with a model, in seconds and bytes: a layer's and the LM head's compute for a
    batch (roofline, or a calibrated profile's fit), a copy's transfer, the host's cost of issuing one, and
    how HBM splits into weights, activations and the KV pool. The simulator prices plans with it and the
    policies size their pools with it."""

    def __init__(self, hw: HardwareSpec, model: ModelSpec, tp: int = 1):
        """`hw` is the per-GPU entry; with `tp` > 1 its GPUs split every layer (tensor parallelism) and
        `self.hw` is their one-engine view."""
        check_tensor_parallel(hw, model, tp)
        self.model, self.tp, self.gpu_hw = model, tp, hw
        self.hw = tp_view(hw, tp)
        self._bandwidth = {"h2d": self.hw.link.h2d_bandwidth, "d2h": self.hw.link.d2h_bandwidth}
        self.roofline = Roofline(hw, model, tp)
        self._fit = hw.fit.check_model(model, hw.name) if hw.fit else None  # a calibrated profile's times
        self.measured = MeasuredLayers(load_profile(hw.profile, model, tp), self.roofline) if hw.profile else None
        self._compute = self.measured or self.roofline

    def layer_time(self, batch: BatchShape, copy_bandwidth: float = 0.0) -> float:
        """Seconds for one transformer layer. `copy_bandwidth` (bytes/s) of concurrent host↔GPU copies
        takes `compute_contention` of itself out of the HBM bandwidth left to compute."""
        if self._fit:
            return self._fit.layer_time(batch, copy_bandwidth)
        return self._compute.layer_time(batch, copy_bandwidth)

    def head_time(self, batch: BatchShape) -> float:
        """Seconds outside the layers: the LM head over the batch's sampled tokens and the engine's host
        time per iteration."""
        if self._fit:
            return self._fit.head_time(batch)
        return self._compute.head_time(batch)

    def all_reduce_time(self, tokens: int) -> float:
        """Seconds of one of a layer's two all-reduces over `tokens` tokens (0 without tensor parallelism;
        in layer_time already)."""
        return 0.0 if self._fit else self._compute.all_reduce_time(tokens)

    def issue_time(self, calls: int) -> float:
        """Seconds of compute time that issuing a copy of `calls` transfer calls takes (a calibrated
        profile's measured host cost; nothing on the roofline, where a GPU's host issues ahead of it)."""
        return self._fit.issue_time(calls) if self._fit else 0.0

    def iteration_time(self, batch: BatchShape) -> float:
        """Seconds for a whole forward pass with no copy in flight and no stall."""
        return self.model.num_layers * self.layer_time(batch) + self.head_time(batch)

    def decode_time(self, sequences: int, attended: int, padded: int) -> float:
        """`iteration_time` of `sequences` decoding one token each, attending to `attended` positions in
        all, `padded` when padded to the longest: the same arithmetic without building a BatchShape, and
        the parts that depend on the batch size alone computed once per size (the simulator prices
        hundreds of thousands of these)."""
        if self._fit:
            return self.iteration_time(BatchShape(decode_tokens=sequences, attended_pairs=attended,
                                                  kv_tokens_read=attended, sampled_tokens=sequences,
                                                  padded_keys=padded, padded_pairs=padded, decode_kv_tokens=attended))
        return self._compute.decode_time(sequences, attended)

    def transfer_time(self, nbytes: int, calls: int = 1, direction: str = "h2d") -> float:
        """Seconds to move `nbytes` in `calls` copies in one direction, alone on the link."""
        if direction not in self._bandwidth:
            raise ValueError(f"unknown direction '{direction}' (known: {', '.join(DIRECTIONS)})")
        if nbytes < 0 or calls < 0 or (nbytes > 0 and calls == 0):
            raise ValueError(f"a transfer needs nbytes >= 0 in calls >= 1, got {nbytes} in {calls}")
        return calls * self.hw.link.transfer_latency + nbytes / self._bandwidth[direction]

    def memory_budget(self, gpu_mem_util: float = 0.9, max_batched_tokens: int | None = None,
                      max_seqs: int = 256, staging_bytes: int = 0) -> MemoryBudget:
        """Split `gpu_mem_util` of HBM into weights, activations, a staging area and the KV pool
        (vLLM's semantics: the fraction bounds everything the engine allocates). Defaults follow vLLM:
        up to 256 sequences and max(2048, context) batched tokens. Refuses a budget with no KV pool.

        With tensor parallelism each GPU spends `gpu_mem_util` of its own HBM on 1/tp of the weights (the
        norms every GPU repeats are under 0.01% of them), a whole layer's working set (conservative: the
        MLP's intermediate is 1/tp of it on each) and 1/tp of the staging area and of the KV pool; the
        budget is their sum (`per_gpu()` for one)."""
        if not 0 < gpu_mem_util <= 1:
            raise ValueError(f"gpu_mem_util must be in (0, 1], got {gpu_mem_util}")
        m, n = self.model, self.tp
        tokens = max_batched_tokens if max_batched_tokens is not None else max(2048, m.max_context)
        usable = n * int(self.gpu_hw.gpu.hbm_bytes * gpu_mem_util)
        weights = n * math.ceil(m.weight_bytes / n)
        activations = n * m.activation_bytes(tokens, max_seqs)
        kv_pool = usable - weights - activations - staging_bytes
        if kv_pool <= 0:
            gib = 1024**3
            on = f"{n} x {self.gpu_hw.name}" if n > 1 else self.hw.name
            raise CapacityError(
                f"{m.name} on {on} leaves no KV pool: weights {weights / gib:.1f} GiB + "
                f"activations {activations / gib:.1f} GiB + staging {staging_bytes / gib:.1f} GiB exceed "
                f"{gpu_mem_util:g} x {self.hw.gpu.hbm_bytes / gib:.0f} GiB HBM")
        return MemoryBudget(usable, weights, activations, staging_bytes, kv_pool, n)
