"""From memory settings to a ready policy: the one place pools are sized, so that the simulator and the
executor build identical engines.

The KV pool (the cost model's memory budget in the simulator, an explicit size in the executor) holds
`G` GPU blocks plus, for the layer-swapping policies, the staging area: `(depth + 1)` slots of `C`
blocks of one layer, where `C`, the most live CPU blocks, is `share / (1 - share)` of the GPU blocks
(static's fixed share, pie's largest: in a simulated system the link's bandwidth bound,
`link_bound_share`) and at most what `cpu_mem_bytes` holds. vllm-swap uses all of
`cpu_mem_bytes` as swap space; vllm uses none.
"""
from __future__ import annotations

import argparse
from functools import lru_cache

from hwmodels import BatchShape, CostModel, HardwareSpec, ModelSpec

from .config import ConfigError, EngineConfig, check_share
from .expansion import ExpansionController
from .flexgen import FlexGenPolicy
from .flexgen_lp import search
from .policies import POLICIES, Policy

ALL_POLICIES = POLICIES + ("flexgen",)
DEFAULT_SHARE = {"static": 0.2, "pie": 0.5}


def policy_share(name: str, share: float | None) -> float:
    """`share` if given, else the policy's default: static's CPU share, pie's largest, 0 for the rest."""
    return DEFAULT_SHARE.get(name, 0.0) if share is None else share


def engine_config(model: ModelSpec, policy: str, kv_pool_bytes: int, *, cpu_mem_bytes: int = 0,
                  share: float = 0.0, block_size: int = 16, max_num_seqs: int = 256,
                  max_num_batched_tokens: int | None = None, **options) -> EngineConfig:
    """Pool sizes for `policy`; `options` go to EngineConfig (chunked_prefill, prefetch_depth, ...)."""
    block_layer = block_size * model.kv_bytes_per_token_layer
    block = block_layer * model.num_layers
    cpu_blocks = cpu_mem_bytes // block
    gpu_blocks, live_cpu = kv_pool_bytes // block, cpu_blocks if policy == "vllm-swap" else 0
    if policy in ("static", "pie"):
        ratio = check_share("share", share) / (1 - share)
        ring = options.get("prefetch_depth", 1) + 1
        gpu_blocks = int(kv_pool_bytes // (block + ring * ratio * block_layer))
        live_cpu = min(cpu_blocks, int(ratio * gpu_blocks))
        gpu_blocks = (kv_pool_bytes - ring * live_cpu * block_layer) // block
    return EngineConfig(num_layers=model.num_layers, block_bytes_layer=block_layer, num_gpu_blocks=int(gpu_blocks),
                        num_cpu_blocks=int(live_cpu), block_size=block_size, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=max_num_batched_tokens or max(2048, model.max_context),
                        max_model_len=model.max_context, **options)


def link_bound_share(cost_model: CostModel, pool_bytes: int, context: int) -> float:
    """The largest CPU share (in steps of 0.01, at most 0.5) at which decodes of `context` tokens filling
    the KV pool and its CPU part stream a layer's CPU-resident KV over the host→device link in no more
    time than the layer computes (the preview's bound, in one contiguous call). Per-call latency and
    prefills only lower what the link carries, so pie's controller never needs more, and the staging
    area sized for it is a few times smaller than one sized for 0.5."""
    m = cost_model.model
    for share in [k / 100 for k in range(50, 0, -1)]:
        batch = max(1, int(pool_bytes / (1 - share) // (context * m.kv_bytes_per_token)))
        layer = cost_model.layer_time(BatchShape.of(decodes=[context] * batch))
        if cost_model.transfer_time(int(share * batch * context * m.kv_bytes_per_token_layer)) <= layer:
            return share
    return 0.0


def coalesce_gap(cost_model: CostModel, block_size: int) -> int:
    """Free block-layers whose bytes cross the host→device link in less time than one call's latency."""
    block_layer = block_size * cost_model.model.kv_bytes_per_token_layer
    latency = cost_model.transfer_time(0, calls=1)
    return int(latency / (cost_model.transfer_time(block_layer, calls=1) - latency))


def make_policy(name: str, config: EngineConfig, share: float | None = None) -> Policy:
    """vllm, vllm-swap, static or pie over `config`; `share` as in engine_config (defaults per policy)."""
    share = policy_share(name, share)
    if name == "pie":
        return Policy(name, config, controller=ExpansionController(max_share=share))
    return Policy(name, config, cpu_share=share)


def build_policy(name: str, cost_model: CostModel, *, share: float | None = None, mean_prompt: int = 512,
                 mean_output: int = 128, gpu_mem_util: float = 0.9, cpu_mem_bytes: int = 0, **settings):
    """Any policy sized for a simulated system: the KV pool from the cost model's memory budget, CPU
    memory checked against the host. FlexGen sizes its block for `mean_prompt` + `mean_output` tokens and
    keeps what it offloads within `cpu_mem_bytes` of CPU memory (0: the host's) and the disk, if any."""
    m, hw = cost_model.model, cost_model.hw
    if name not in ALL_POLICIES:
        raise ConfigError(f"unknown policy '{name}' (known: {', '.join(ALL_POLICIES)})")
    if cpu_mem_bytes > hw.host.memory_bytes:
        raise ConfigError(f"cpu_mem_bytes {cpu_mem_bytes / 1024**3:.1f} GiB exceeds {hw.name}'s host memory "
                          f"{hw.host.memory_bytes / 1024**3:.1f} GiB")
    if name == "flexgen":
        output = min(mean_output, m.max_context - mean_prompt)
        placement = _flexgen_placement(hw, m, mean_prompt, output, gpu_mem_util, cpu_mem_bytes or None)
        return FlexGenPolicy(cost_model, placement)
    tokens = settings.get("max_num_batched_tokens") or max(2048, m.max_context)
    pool = cost_model.memory_budget(gpu_mem_util, tokens, settings.get("max_num_seqs", 256)).kv_pool_bytes
    if name == "pie" and share is None:
        share = link_bound_share(cost_model, pool, mean_prompt + mean_output)
    share = policy_share(name, share)
    if name in ("static", "pie"):
        settings.setdefault("coalesce_gap", coalesce_gap(cost_model, settings.get("block_size", 16)))
    config = engine_config(m, name, pool, cpu_mem_bytes=cpu_mem_bytes, share=share, **settings)
    return make_policy(name, config, share)


@lru_cache(maxsize=16)
def _flexgen_placement(hw: HardwareSpec, model: ModelSpec, prompt: int, output: int, gpu_mem_util: float,
                       cpu_mem_bytes: int | None):
    """FlexGen's LP search (seconds) once per system and shape: a sweep over rates re-uses it."""
    return search(CostModel(hw, model), prompt, output, gpu_mem_util, cpu_mem_bytes=cpu_mem_bytes)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine options both command lines take (see `engine_settings`)."""
    parser.add_argument("--share", type=float, help="static: CPU share (default 0.2); pie: largest share (default: the link's bound "
                        "in pie-sim, 0.5 in pie-exec)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--chunked-prefill", action="store_true")
    parser.add_argument("--prefetch-depth", type=int, default=1, help="layers prefetched ahead (pie, static)")
    parser.add_argument("--seed", type=int, default=0)


def engine_settings(args: argparse.Namespace) -> dict:
    """Keyword arguments for engine_config / build_policy from `add_engine_arguments`' options."""
    return dict(block_size=args.block_size, max_num_seqs=args.max_num_seqs, chunked_prefill=args.chunked_prefill,
                prefetch_depth=args.prefetch_depth)
