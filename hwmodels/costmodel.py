"""Cost model shared by the simulator and the policies: how long things take and what fits.

Compute is a roofline per part of a layer — the GEMMs and the attention each take the longer of their
FLOPs at `peak · flops_efficiency` and their HBM bytes at `bandwidth · hbm_efficiency` — plus a fixed
per-layer overhead. Summing the parts (rather than one roofline over the layer) keeps decode's
memory-bound attention from hiding under compute-bound GEMMs at large batches. A copy costs a fixed
latency per call plus its bytes at the direction's bandwidth.
"""
from __future__ import annotations

from dataclasses import dataclass

from .batch import BatchShape
from .hardware import HardwareSpec
from .models import ModelSpec

DIRECTIONS = ("h2d", "d2h")


class CapacityError(ValueError):
    """The model (or a request) does not fit in the memory the configuration allows."""


@dataclass(frozen=True)
class MemoryBudget:
    """How one GPU's HBM is spent, in bytes. The KV pool gets what the rest leaves."""
    usable_bytes: int
    weight_bytes: int
    activation_bytes: int
    staging_bytes: int
    kv_pool_bytes: int

    def kv_blocks(self, block_bytes: int) -> int:
        """Whole KV blocks (all layers of `block_tokens` tokens) that fit in the pool."""
        return self.kv_pool_bytes // block_bytes


class CostModel:
    def __init__(self, hw: HardwareSpec, model: ModelSpec):
        self.hw, self.model = hw, model
        gpu = hw.gpu
        self._flops_rate = gpu.peak_flops * gpu.flops_efficiency
        self._hbm_rate = gpu.hbm_bandwidth * gpu.hbm_efficiency
        self._bandwidth = {"h2d": hw.link.h2d_bandwidth, "d2h": hw.link.d2h_bandwidth}
        # A layer's FLOPs and bytes are linear in the batch's sums (see BatchShape): read the coefficients
        # off the model once, so costing an iteration is a few multiplications (exact: they are integers).
        empty, token = BatchShape(), BatchShape(decode_tokens=1)
        self._linear_flops = model.linear_flops(token)
        self._weight_bytes = model.linear_bytes(empty)
        self._token_bytes = model.linear_bytes(token) - self._weight_bytes
        self._experts_read = model.expert_bytes_read if model.moe else None  # not linear in the tokens
        self._pair_flops = model.attention_flops(BatchShape(attended_pairs=1))
        self._read_bytes = model.attention_bytes(BatchShape(kv_tokens_read=1))
        self._new_bytes = model.attention_bytes(token)
        sample = BatchShape(sampled_tokens=1)
        self._head_flops = model.head_flops(sample)
        self._head_bytes = model.head_bytes(empty)
        self._sample_bytes = model.head_bytes(sample) - self._head_bytes
        self._fit = hw.fit.check_model(model, hw.name) if hw.fit else None  # a calibrated profile's times
        self._per_batch_size: dict[int, tuple[float, float, float]] = {}  # decode_time's parts per batch size

    def layer_time(self, batch: BatchShape, copy_bandwidth: float = 0.0) -> float:
        """Seconds for one transformer layer. `copy_bandwidth` (bytes/s) of concurrent host↔GPU copies
        takes `compute_contention` of itself out of the HBM bandwidth left to compute."""
        if self._fit:
            return self._fit.layer_time(batch, copy_bandwidth)
        return self._roofline_layer(batch.tokens, batch.attended_pairs, batch.kv_tokens_read, copy_bandwidth)

    def _roofline_layer(self, tokens: int, pairs: int, read: int, copy_bandwidth: float) -> float:
        hbm_rate = self._hbm_rate - self.hw.link.compute_contention * copy_bandwidth
        if hbm_rate <= 0:
            raise ValueError(f"copies at {copy_bandwidth:.3g} B/s leave no HBM bandwidth to compute")
        flops = self._flops_rate
        linear = max(self._linear_flops * tokens / flops, self._linear_bytes(tokens) / hbm_rate)
        attention = max(self._pair_flops * pairs / flops, (self._read_bytes * read + self._new_bytes * tokens) / hbm_rate)
        return linear + attention + self.hw.gpu.layer_overhead

    def _linear_bytes(self, tokens: int) -> float:
        """HBM bytes of a layer's GEMMs for `tokens` tokens: linear in them, plus, in a mixture of experts,
        the experts' weights they are expected to read."""
        nbytes = self._weight_bytes + self._token_bytes * tokens
        return nbytes if self._experts_read is None else nbytes + self._experts_read(tokens)

    def head_time(self, batch: BatchShape) -> float:
        """Seconds for the LM head over the batch's sampled tokens (embedding lookup is negligible)."""
        if self._fit:
            return self._fit.head_time(batch)
        return self._roofline_head(batch.sampled_tokens)

    def issue_time(self, calls: int) -> float:
        """Seconds of compute time that issuing a copy of `calls` transfer calls takes (a calibrated
        profile's measured host cost; nothing on the roofline, where a GPU's host issues ahead of it)."""
        return self._fit.issue_time(calls) if self._fit else 0.0

    def _roofline_head(self, sampled: int) -> float:
        return max(self._head_flops * sampled / self._flops_rate, (self._head_bytes + self._sample_bytes * sampled) / self._hbm_rate)

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
                                                  padded_keys=padded, padded_pairs=padded))
        known = self._per_batch_size.get(sequences)
        if known is None:
            linear = max(self._linear_flops * sequences / self._flops_rate,
                         self._linear_bytes(sequences) / self._hbm_rate)
            known = self._per_batch_size[sequences] = (linear, self._new_bytes * sequences, self._roofline_head(sequences))
        linear, new_bytes, head = known
        attention = max(self._pair_flops * attended / self._flops_rate, (self._read_bytes * attended + new_bytes) / self._hbm_rate)
        return self.model.num_layers * (linear + attention + self.hw.gpu.layer_overhead) + head

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
        up to 256 sequences and max(2048, context) batched tokens. Refuses a budget with no KV pool."""
        if not 0 < gpu_mem_util <= 1:
            raise ValueError(f"gpu_mem_util must be in (0, 1], got {gpu_mem_util}")
        m = self.model
        tokens = max_batched_tokens if max_batched_tokens is not None else max(2048, m.max_context)
        usable = int(self.hw.gpu.hbm_bytes * gpu_mem_util)
        activations = m.activation_bytes(tokens, max_seqs)
        kv_pool = usable - m.weight_bytes - activations - staging_bytes
        if kv_pool <= 0:
            gib = 1024**3
            raise CapacityError(
                f"{m.name} on {self.hw.name} leaves no KV pool: weights {m.weight_bytes / gib:.1f} GiB + "
                f"activations {activations / gib:.1f} GiB + staging {staging_bytes / gib:.1f} GiB exceed "
                f"{gpu_mem_util:g} x {self.hw.gpu.hbm_bytes / gib:.0f} GiB HBM")
        return MemoryBudget(usable, m.weight_bytes, activations, staging_bytes, kv_pool)
