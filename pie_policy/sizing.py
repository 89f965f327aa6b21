"""From hardware, model and memory settings to a ready policy: the one place pools are sized, so that the
simulator and the executor build identical engines.

GPU: the KV pool is what the cost model's memory budget leaves after weights and activations, less the
staging area of the layer-swapping policies: `(depth + 1)` staging slots of `C` blocks of one layer,
where `C`, the most live CPU blocks, is `share / (1 - share)` of the GPU blocks (static's fixed share,
pie's `max_share`) and at most what `cpu_mem_bytes` holds. CPU: `cpu_mem_bytes` of host memory, at
most the host's capacity.
"""
from __future__ import annotations

from hwmodels import CostModel

from .config import ConfigError, EngineConfig, check_share
from .expansion import ExpansionController
from .flexgen import FlexGenPolicy
from .flexgen_lp import search
from .policies import POLICIES, Policy

ALL_POLICIES = POLICIES + ("flexgen",)


def engine_config(cost_model: CostModel, policy: str, *, gpu_mem_util: float = 0.9, cpu_mem_bytes: int = 0,
                  share: float = 0.0, block_size: int = 16, max_num_seqs: int = 256,
                  max_num_batched_tokens: int | None = None, **options) -> EngineConfig:
    """Pool sizes for `policy`; `options` go to EngineConfig (chunked_prefill, prefetch_depth, ...)."""
    m, hw = cost_model.model, cost_model.hw
    if cpu_mem_bytes > hw.host.memory_bytes:
        raise ConfigError(f"cpu_mem_bytes {cpu_mem_bytes / 1024**3:.1f} GiB exceeds {hw.name}'s host memory "
                          f"{hw.host.memory_bytes / 1024**3:.1f} GiB")
    tokens = max_num_batched_tokens or max(2048, m.max_context)
    pool = cost_model.memory_budget(gpu_mem_util, tokens, max_num_seqs).kv_pool_bytes
    block_layer = block_size * m.kv_bytes_per_token_layer
    block = block_layer * m.num_layers
    cpu_blocks = cpu_mem_bytes // block
    gpu_blocks, live_cpu = pool // block, cpu_blocks if policy == "vllm-swap" else 0
    if policy in ("static", "pie"):
        ratio = check_share("share", share) / (1 - share)
        ring = options.get("prefetch_depth", 1) + 1
        gpu_blocks = int(pool // (block + ring * ratio * block_layer))
        live_cpu = min(cpu_blocks, int(ratio * gpu_blocks))
        gpu_blocks = (pool - ring * live_cpu * block_layer) // block
    return EngineConfig(num_layers=m.num_layers, block_bytes_layer=block_layer, num_gpu_blocks=int(gpu_blocks),
                        num_cpu_blocks=int(live_cpu), block_size=block_size, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=tokens, max_model_len=m.max_context, **options)


def build_policy(name: str, cost_model: CostModel, *, share: float | None = None, mean_prompt: int = 512,
                 mean_output: int = 128, gpu_mem_util: float = 0.9, **settings):
    """A policy by name. `share`: static's CPU share (default 0.2) or pie's largest (default 0.5).
    FlexGen sizes its block for `mean_prompt` + `mean_output` tokens."""
    if name not in ALL_POLICIES:
        raise ConfigError(f"unknown policy '{name}' (known: {', '.join(ALL_POLICIES)})")
    if name == "flexgen":
        output = min(mean_output, cost_model.model.max_context - mean_prompt)
        return FlexGenPolicy(cost_model, search(cost_model, mean_prompt, output, gpu_mem_util))
    share = {"static": 0.2, "pie": 0.5}.get(name, 0.0) if share is None else share
    config = engine_config(cost_model, name, gpu_mem_util=gpu_mem_util, share=share, **settings)
    if name == "pie":
        return Policy(name, config, controller=ExpansionController(max_share=share))
    return Policy(name, config, cpu_share=share)
