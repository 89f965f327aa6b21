"""The check's workloads and what they need in memory, worked out from the catalogs alone (no torch), so
that a model that does not fit is refused before anything is allocated."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from hwmodels import GiB, ModelSpec, load_model

TINY_MODEL = str(Path(__file__).with_name("tiny-opt.toml"))  # the CPU dry run's model
DEFAULT_MODELS = {"cuda": ("opt-6.7b", "opt-1.3b"), "cpu": (TINY_MODEL, TINY_MODEL)}  # (overlap, serving)
DTYPE_BYTES = {"cuda": 2, "cpu": 4}  # FP16 on a GPU, FP32 on the CPU: the executor's defaults
CONTEXT_MARGIN = 1 * GiB  # CUDA context, cuBLAS workspaces, the allocator's rounding
SHARES = (0.05, 0.10, 0.20)  # of every sequence's KV blocks in CPU memory
DEPTHS = (1, 2, 3)           # layers prefetched ahead
QUICK_SHARES, QUICK_DEPTHS = (0.10, 0.20), (1, 2)


@dataclass(frozen=True)
class DecodeBatch:
    """The overlap step's decode batch: `batch` sequences of `context` tokens (the last one new)."""
    batch: int
    context: int
    block_size: int

    @property
    def blocks(self) -> int:
        """Blocks per sequence."""
        return -(-self.context // self.block_size)

    def cpu_blocks(self, share: float) -> int:
        """Blocks per sequence in CPU memory for `share`: the nearest count, at least one for a share above
        0 and never the last block (the one the new token is written to stays on the GPU, as pie keeps a
        sequence's growing tail there)."""
        return 0 if share <= 0 else min(self.blocks - 1, max(1, round(share * self.blocks)))


def decode_batch(device: str) -> DecodeBatch:
    """A decode batch whose KV read per layer is about the weights' on a 6.7B model (memory-bound, the
    regime layer swapping is for); a tiny one on the CPU."""
    return DecodeBatch(32, 1024, 16) if device == "cuda" else DecodeBatch(4, 64, 4)


def model_at(name: str, device: str) -> ModelSpec:
    """The catalog model (or TOML) at the executor's default dtype on `device`."""
    return dataclasses.replace(load_model(name), dtype_bytes=DTYPE_BYTES[device])


def pinned_bytes(nbytes: int) -> int:
    """What torch's caching host allocator takes for a pinned tensor of `nbytes`: the next power of two."""
    return 1 << max(0, nbytes - 1).bit_length()


@dataclass(frozen=True)
class Needs:
    """Bytes a step allocates: on the device (weights, KV pools, working memory) and pinned on the host."""
    weights: int
    kv: int
    working: int
    pinned: int

    @property
    def device(self) -> int:
        return self.weights + self.kv + self.working

    def describe(self) -> str:
        return (f"weights {self.weights / GiB:.1f}, KV pools {self.kv / GiB:.1f}, working "
                f"{self.working / GiB:.1f}")


def background_blocks(spec: ModelSpec, shape: DecodeBatch, device: str) -> int:
    """Blocks (one layer's) of the overlap step's background copier: two halves, one a direction, of
    64 MiB a copy on a GPU (1 MiB on the CPU)."""
    half = (64 if device == "cuda" else 1) * (1 << 20) // (shape.block_size * spec.kv_bytes_per_token_layer)
    return 2 * max(1, half)


def overlap_needs(spec: ModelSpec, shape: DecodeBatch, background_blocks: int) -> Needs:
    """The overlap step: the whole batch's KV in the device pool, the largest share's CPU blocks in the
    pinned pool and `max(DEPTHS) + 1` staging slots of them, the background copier's rows; working
    memory: a layer's gathered K and V (twice: gathered and attended) and the margin."""
    block_layer = shape.block_size * spec.kv_bytes_per_token_layer
    cpu = shape.batch * shape.cpu_blocks(max(SHARES))
    kv = shape.batch * shape.blocks * spec.num_layers * block_layer + (max(DEPTHS) + 1) * cpu * block_layer
    kv += (background_blocks + 1) * block_layer
    working = 4 * shape.batch * shape.blocks * block_layer + CONTEXT_MARGIN
    pinned = pinned_bytes(cpu * spec.num_layers * block_layer) + pinned_bytes(background_blocks * block_layer)
    return Needs(spec.weight_bytes, kv, working, pinned)


def serving_needs(spec: ModelSpec, gpu_kv_bytes: int, cpu_kv_bytes: int) -> Needs:
    """Calibrate and validate: the weights, validate's device pool (calibrate's largest grid point is
    smaller), activations of a 2048-token batch and the margin; validate's pinned CPU pool."""
    working = spec.activation_bytes(2048, 256) + CONTEXT_MARGIN
    return Needs(spec.weight_bytes, gpu_kv_bytes, working, pinned_bytes(cpu_kv_bytes))
