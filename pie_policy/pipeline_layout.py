"""A model laid out over a pipeline of GPUs: contiguous layer slices, each GPU's weights and KV pool.

Layers are split as vLLM splits them (`get_pp_indices`): L // N each, the remainder one more each on the
stages just before the last, which also holds the LM head. The first stage holds the token (and, in OPT,
position) embeddings; the last the final norm and the LM head, a copy of the embedding matrix when tied and
N > 1. Every GPU reserves the cost model's activation working set and gives what is left of `gpu_mem_util`
of its HBM to KV. A pipeline block is `block_size` tokens of every layer, each GPU holding its own layers'
part of it, so the pipeline holds as many blocks as its tightest GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

from hwmodels import BatchShape, CapacityError, CostModel, GiB, ModelSpec


def split_layers(num_layers: int, num_stages: int) -> tuple[int, ...]:
    """Layers per stage, vLLM's way."""
    if not 1 <= num_stages <= num_layers:
        raise CapacityError(f"cannot split {num_layers} layers over {num_stages} pipeline stages")
    layers = [num_layers // num_stages] * num_stages
    for stage in range(num_stages - 1 - num_layers % num_stages, num_stages - 1):
        layers[stage] += 1
    return tuple(layers)


def stage_weight_bytes(model: ModelSpec, layers: tuple[int, ...]) -> tuple[int, ...]:
    """Bytes of weights each stage holds: its layers, plus the embeddings (first) and norm and head (last)."""
    h, vocab = model.hidden_size, model.vocab_size
    first = vocab * h + ((model.max_context + 2) * h if model.family == "opt" else 0)
    head = 0 if model.tied_embeddings and len(layers) == 1 else vocab * h
    last = (2 * h if model.family == "opt" else h) + head
    params = [n * model.params_per_layer for n in layers]
    params[0] += first
    params[-1] += last
    return tuple(p * model.dtype_bytes for p in params)


@dataclass(frozen=True)
class StageLayout:
    layers: tuple[int, ...]          # per stage, its number of layers
    weight_bytes: tuple[int, ...]    # per stage, the weights its GPU holds
    kv_pool_bytes: tuple[int, ...]   # per stage, its GPU's HBM left for KV
    block_bytes_layer: int           # K and V of one block in one layer

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    def block_bytes(self, stage: int) -> int:
        """A pipeline block's part on `stage`'s GPU."""
        return self.block_bytes_layer * self.layers[stage]

    def blocks_held(self, reserved: tuple[int, ...] | None = None) -> int:
        """Pipeline blocks every GPU can hold after `reserved` bytes of its KV pool (per stage)."""
        reserved = reserved or (0,) * self.num_stages
        return min((pool - r) // self.block_bytes(s)
                   for s, (pool, r) in enumerate(zip(self.kv_pool_bytes, reserved)))


def stage_layout(cost_model: CostModel, num_stages: int, gpu_mem_util: float, max_batched_tokens: int,
                 max_seqs: int, block_size: int) -> StageLayout:
    """The layout of `cost_model`'s model over `num_stages` GPUs of its hardware; refuses a split that leaves
    a GPU no KV pool."""
    m, hw = cost_model.model, cost_model.hw
    if not 0 < gpu_mem_util <= 1:
        raise ValueError(f"gpu_mem_util must be in (0, 1], got {gpu_mem_util}")
    layers = split_layers(m.num_layers, num_stages)
    weights = stage_weight_bytes(m, layers)
    usable, activations = int(hw.gpu.hbm_bytes * gpu_mem_util), m.activation_bytes(max_batched_tokens, max_seqs)
    pools = tuple(usable - w - activations for w in weights)
    block_layer = block_size * m.kv_bytes_per_token_layer
    for stage, pool in enumerate(pools):
        if pool < block_layer * layers[stage]:
            raise CapacityError(
                f"{m.name} over {num_stages} x {hw.name}: stage {stage} ({layers[stage]} layers) leaves no KV pool: "
                f"weights {weights[stage] / GiB:.1f} GiB + activations {activations / GiB:.1f} GiB exceed "
                f"{gpu_mem_util:g} x {hw.gpu.hbm_bytes / GiB:.0f} GiB HBM")
    return StageLayout(layers, weights, pools, block_layer)


def stage_time(cost_model: CostModel, layout: StageLayout, stage: int, shape: BatchShape,
               copy_bandwidth: float = 0.0) -> float:
    """Seconds `stage` computes `shape`: its layers, and the LM head on the last stage."""
    took = layout.layers[stage] * cost_model.layer_time(shape, copy_bandwidth)
    return took + (cost_model.head_time(shape) if stage == layout.num_stages - 1 else 0.0)
