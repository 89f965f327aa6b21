"""Engine limits shared by every policy, checked once so that nothing downstream re-checks them."""
from __future__ import annotations

from dataclasses import dataclass


class ConfigError(ValueError):
    """A policy or engine setting that cannot work."""


@dataclass(frozen=True)
class EngineConfig:
    """Sizes and limits of one engine. Blocks hold `block_size` tokens of every layer; a CPU block is
    live KV (pie, static) or swap space (vllm-swap), as the policy decides.

    Defaults are vLLM's: 16-token blocks, 256 sequences, 2048 batched tokens, 1% watermark.
    """
    num_layers: int
    block_bytes_layer: int          # K and V of one block in one layer
    num_gpu_blocks: int
    num_cpu_blocks: int = 0
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    watermark: float = 0.01         # share of GPU blocks kept free when admitting a new sequence
    chunked_prefill: bool = False
    prefetch_depth: int = 1         # layers prefetched ahead of the one computing
    dirty_only_writeback: bool = True
    coalesce_gap: int = 0           # free CPU slots a prefetch may span to join two runs (layerswap.py)

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_bytes_layer", "num_gpu_blocks", "block_size", "max_num_seqs",
                     "max_num_batched_tokens", "max_model_len", "prefetch_depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.coalesce_gap < 0:
            raise ConfigError(f"coalesce_gap must not be negative, got {self.coalesce_gap}")
        if self.num_cpu_blocks < 0:
            raise ConfigError(f"num_cpu_blocks must not be negative, got {self.num_cpu_blocks}")
        for name in ("max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) % self.block_size:
                raise ConfigError(f"block_size {self.block_size} does not divide {name} {getattr(self, name)}")
        if not 0 <= self.watermark < 1:
            raise ConfigError(f"watermark must be in [0, 1), got {self.watermark}")
        if not self.chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) "
                              f"must be at least max_model_len ({self.max_model_len}) so every prompt fits")

    @property
    def block_bytes(self) -> int:
        """One block across all layers."""
        return self.block_bytes_layer * self.num_layers

    @property
    def watermark_blocks(self) -> int:
        return int(self.watermark * self.num_gpu_blocks)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


def check_share(name: str, share: float) -> float:
    """A CPU share must lie in [0, 1)."""
    if not 0 <= share < 1:
        raise ConfigError(f"{name} must be in [0, 1), got {share}")
    return share
