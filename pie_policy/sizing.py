"""From memory settings to a ready policy: the one place pools are sized, so that the simulator and the
executor build identical engines.

The KV pool (the cost model's memory budget in the simulator, an explicit size in the executor) holds
`G` GPU blocks plus, for the layer-swapping policies, the staging area: `(depth + 1)` slots of `C`
blocks of one layer, where `C`, the most live CPU blocks, is `share / (1 - share)` of the GPU blocks
(static's fixed share, pie's largest: the link's bandwidth bound, `link_bound_share`, on the hardware
the run is priced on) and at most what `cpu_mem_bytes` holds. vllm-swap uses all of `cpu_mem_bytes` as
swap space; vllm uses none. `engine_policy` is the one place both backends build a single engine from,
so that the pie `pie-validate` checks on the executor is the pie `pie-sim` simulates.

The pipeline policies (pp-vllm, pipemax) split the model over the server's GPUs (pipeline_layout.py): the
node holds as many pipeline blocks as its tightest GPU, pipemax's after two staging slots sized for a
typical decode window and the activations of a slot's worth of streamed tokens (pipemax.py), shared
equally by the micro-batches' engines; pipemax streams from `cpu_mem_bytes`.
"""
from __future__ import annotations

from functools import lru_cache

from hwmodels import BatchShape, CapacityError, CostModel, GiB, HardwareSpec, ModelSpec

from .config import ConfigError, EngineConfig, check_share
from .expansion import ExpansionController
from .flexgen import FlexGenPolicy
from .flexgen_lp import search
from .pipeline import PipelinePolicy, check_micro_batches
from .pipeline_layout import stage_layout
from .pipemax import SLOTS, Streamer, copy_bandwidth_share, slot_blocks
from .plan import H2D
from .policies import Policy
from .registry import FLEXGEN, LIVE_KV, PIPELINE, REGISTRY, SIM, SWAP_SPACE, entry, names

# What a one-GPU system runs: every simulated policy but the pipelines, which take a server's GPUs.
SINGLE_GPU_POLICIES = tuple(name for name in names(backend=SIM) if REGISTRY[name].family != PIPELINE)


def policy_share(name: str, share: float | None) -> float:
    """`share` if given, else the policy's default (registry.py): static's CPU share, pie's largest, 0 for
    the GPU-only ones."""
    return REGISTRY[name].default_share if share is None else share


def engine_config(model: ModelSpec, policy: str, kv_pool_bytes: int, *, cpu_mem_bytes: int = 0,
                  share: float | None = None, block_size: int = 16, max_num_seqs: int = 256,
                  max_num_batched_tokens: int | None = None, **options) -> EngineConfig:
    """Pool sizes for `policy` (`share`: as `policy_share`); `options` go to EngineConfig (chunked_prefill,
    prefetch_depth, ...)."""
    share = policy_share(policy, share)
    block_layer = block_size * model.kv_bytes_per_token_layer
    block = block_layer * model.num_layers
    cpu_blocks = cpu_mem_bytes // block
    cpu_use = REGISTRY[policy].cpu_blocks
    gpu_blocks, live_cpu = kv_pool_bytes // block, cpu_blocks if cpu_use == SWAP_SPACE else 0
    if cpu_use == LIVE_KV:
        ratio = check_share("share", share) / (1 - share)
        ring = options.get("prefetch_depth", 1) + 1
        gpu_blocks = int(kv_pool_bytes // (block + ring * ratio * block_layer))
        live_cpu = min(cpu_blocks, int(ratio * gpu_blocks))
        gpu_blocks = (kv_pool_bytes - ring * live_cpu * block_layer) // block
    return EngineConfig(num_layers=model.num_layers, block_bytes_layer=block_layer, num_gpu_blocks=int(gpu_blocks),
                        num_cpu_blocks=int(live_cpu), block_size=block_size, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=max_num_batched_tokens or max(2048, model.max_context),
                        max_model_len=model.max_context, **options)


def pooled_batch(model: ModelSpec, pool_bytes: int, context: int, share: float) -> int:
    """Sequences of `context` tokens whose KV fits a GPU pool of `pool_bytes` when `share` of it is in CPU
    memory."""
    return int(pool_bytes / (1 - share) // (context * model.kv_bytes_per_token))


def layer_and_stream(cost_model: CostModel, batch: int, context: int, share: float) -> tuple[float, float]:
    """(one layer's compute, the host→device transfer of its CPU-resident KV in one call) for `batch`
    decodes of `context` tokens with `share` of their KV in CPU memory. Layer swapping hides the transfer
    while it is no longer than the layer (the closed form of `link_bound_share` and the preview)."""
    layer = cost_model.layer_time(BatchShape.of(decodes=[context] * batch))
    transfer = cost_model.transfer_time(int(share * batch * context * cost_model.model.kv_bytes_per_token_layer))
    return layer, transfer


def link_bound_share(cost_model: CostModel, pool_bytes: int, context: int) -> float:
    """The largest CPU share (in steps of 0.01, at most 0.5) at which decodes of `context` tokens filling
    the KV pool and its CPU part stream a layer's CPU-resident KV over the host→device link in no more
    time than the layer computes (`layer_and_stream`). Per-call latency and prefills only lower what the
    link carries, so pie's controller never needs more, and the staging area sized for it is a few times
    smaller than one sized for 0.5."""
    for share in [k / 100 for k in range(50, 0, -1)]:
        layer, transfer = layer_and_stream(cost_model, max(1, pooled_batch(cost_model.model, pool_bytes, context, share)),
                                           context, share)
        if transfer <= layer:
            return share
    return 0.0


def coalesce_gap(cost_model: CostModel, block_size: int) -> int:
    """Free block-layers whose bytes cross the host→device link in less time than one call's latency."""
    block_layer = block_size * cost_model.model.kv_bytes_per_token_layer
    latency = cost_model.transfer_time(0, calls=1)
    return int(latency / (cost_model.transfer_time(block_layer, calls=1) - latency))


def make_policy(name: str, config: EngineConfig, share: float | None = None,
                cost_model: CostModel | None = None) -> Policy:
    """A single-engine policy over `config`; `share` as in engine_config (defaults per policy). An adaptive
    policy's controller starts at 0 with `share` its largest and prices batches on `cost_model`."""
    share = policy_share(name, share)
    if REGISTRY[name].adaptive:
        controller = ExpansionController(max_share=share, prefetch_depth=config.prefetch_depth)
        return Policy(name, config, controller=controller, cost_model=cost_model)
    return Policy(name, config, cpu_share=share)


def engine_policy(name: str, cost_model: CostModel, kv_pool_bytes: int, *, context: int, cpu_mem_bytes: int = 0,
                  share: float | None = None, **settings) -> Policy:
    """A single-engine policy as both backends build it, on a KV pool of `kv_pool_bytes` (the simulator's
    from the memory budget, the executor's from its option) for requests of `context` tokens on average:
    pie's largest share the link's bound (`link_bound_share`) unless `share` is given, prefetches that
    span gaps cheaper than a call (`coalesce_gap`) for every policy that streams live KV, the staging area
    sized for the share (`engine_config`), pie's controller pricing batches on `cost_model`."""
    policy = REGISTRY[name]
    if policy.adaptive and share is None:
        share = link_bound_share(cost_model, kv_pool_bytes, context)
    share = policy_share(name, share)
    if policy.cpu_blocks == LIVE_KV:
        settings.setdefault("coalesce_gap", coalesce_gap(cost_model, settings.get("block_size", 16)))
    config = engine_config(cost_model.model, name, kv_pool_bytes, cpu_mem_bytes=cpu_mem_bytes, share=share,
                           **settings)
    return make_policy(name, config, share, cost_model)


def build_policy(name: str, cost_model: CostModel, *, share: float | None = None, mean_prompt: int = 512,
                 mean_output: int = 128, gpu_mem_util: float = 0.9, cpu_mem_bytes: int = 0, **settings):
    """Any policy sized for a simulated system: the KV pool from the cost model's memory budget, CPU
    memory checked against the host. FlexGen sizes its block for `mean_prompt` + `mean_output` tokens and
    keeps what it offloads within `cpu_mem_bytes` of CPU memory (0: the host's) and the disk, if any.
    `micro_batches` applies to the pipeline policies only (None: their default)."""
    m, hw = cost_model.model, cost_model.hw
    policy = entry(name, SIM)
    if cpu_mem_bytes > hw.host.memory_bytes:
        raise ConfigError(f"cpu_mem_bytes {cpu_mem_bytes / GiB:.1f} GiB exceeds {hw.name}'s host memory "
                          f"{hw.host.memory_bytes / GiB:.1f} GiB")
    micro_batches = settings.pop("micro_batches", None)
    if policy.family == PIPELINE:
        if cost_model.tp > 1:
            raise ConfigError(f"{name} splits the layers over every GPU of the server; tensor parallelism within "
                              f"its stages is not modelled (tp must be 1, got {cost_model.tp})")
        return build_pipeline_policy(name, cost_model, micro_batches=micro_batches, gpu_mem_util=gpu_mem_util,
                                     cpu_mem_bytes=cpu_mem_bytes, context=mean_prompt + mean_output // 2, **settings)
    if policy.family == FLEXGEN:
        if mean_prompt >= m.max_context:
            raise ConfigError(f"flexgen: the mean prompt of {mean_prompt} tokens does not fit {m.name}'s context of "
                              f"{m.max_context} tokens (no request leaves room for an output)")
        output = min(mean_output, m.max_context - mean_prompt)
        placement = _flexgen_placement(cost_model.gpu_hw, m, cost_model.tp, mean_prompt, output, gpu_mem_util,
                                       cpu_mem_bytes or None)
        return FlexGenPolicy(cost_model, placement)
    tokens = settings.get("max_num_batched_tokens") or max(2048, m.max_context)
    pool = cost_model.memory_budget(gpu_mem_util, tokens, settings.get("max_num_seqs", 256)).kv_pool_bytes
    return engine_policy(name, cost_model, pool, context=mean_prompt + mean_output, cpu_mem_bytes=cpu_mem_bytes,
                         share=share, **settings)


def build_pipeline_policy(name: str, cost_model: CostModel, *, micro_batches: int | None = None,
                          gpu_mem_util: float = 0.9, cpu_mem_bytes: int = 0, context: int = 576, block_size: int = 16,
                          max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                          **options) -> PipelinePolicy:
    """pp-vllm or pipemax over every GPU of the cost model's server; `context` (a request's mean context
    while it decodes) sizes pipemax's staging slots. Micro-batches default to one per GPU (vLLM's virtual
    engines); more split the resident KV among more engines (pipemax.py)."""
    m, hw = cost_model.model, cost_model.hw
    stages = hw.server.num_gpus
    tokens = max_num_batched_tokens or max(2048, m.max_context)
    micro_batches = check_micro_batches(stages if micro_batches is None else micro_batches, stages)
    layout = stage_layout(cost_model, stages, gpu_mem_util, tokens, max_num_seqs, block_size)
    blocks, block_bytes = layout.blocks_held(), block_size * m.kv_bytes_per_token
    if name == "pipemax":
        bandwidth = copy_bandwidth_share(hw, stages)
        batch = max(1, blocks // micro_batches * block_size // context)
        slot = slot_blocks(cost_model, bandwidth[H2D], batch, context, block_size, blocks)
        # a plan's streamed group (at most a slot's tokens and sequences) comes on top of the engine's limits
        activations = m.activation_bytes(tokens + slot * block_size, max_num_seqs + slot) - \
            m.activation_bytes(tokens, max_num_seqs)
        blocks = layout.blocks_held(tuple(SLOTS * slot * layout.block_bytes(s) + activations for s in range(stages)))
    if blocks < micro_batches:
        raise CapacityError(f"{m.name} over {stages} x {hw.name}: {blocks} KV blocks cannot be shared by "
                            f"{micro_batches} micro-batches ({name})")
    config = engine_config(m, "vllm", blocks // micro_batches * block_bytes, block_size=block_size,
                           max_num_seqs=max_num_seqs, max_num_batched_tokens=tokens, **options)
    streamer = Streamer(config, layout, cost_model, cpu_mem_bytes // block_bytes, slot, bandwidth) \
        if name == "pipemax" else None
    return PipelinePolicy(name, config, layout, micro_batches, cost_model, streamer)


@lru_cache(maxsize=16)
def _flexgen_placement(hw: HardwareSpec, model: ModelSpec, tp: int, prompt: int, output: int, gpu_mem_util: float,
                       cpu_mem_bytes: int | None):
    """FlexGen's LP search (seconds) once per system and shape: a sweep over rates re-uses it."""
    return search(CostModel(hw, model, tp), prompt, output, gpu_mem_util, cpu_mem_bytes=cpu_mem_bytes)
