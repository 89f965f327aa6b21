"""The paged KV cache of the executor: a GPU pool, a CPU pool and the staging area, addressed through
pie_policy's block tables and plans.

Every pool holds blocks of shape [2, block_size, kv_heads, head_dim] (K then V), one tensor per tier with
the layer first: GPU pool [L, G, ...], CPU pool [L, C, ...] (pinned on CUDA, so copies are asynchronous),
staging [slots, C, ...], each slot mirroring one layer of the CPU pool (a block keeps its CPU slot as its
row). A sequence's block on the GPU is read in place; a block on the CPU is read from the staging slot
the plan names for the layer, where the plan's prefetch put it, and new tokens written there go back to
the CPU by the plan's write-back.

A pipeline stage holds the pools of its own layers only (`layers`, a slice of the model's): the pools'
first dimension counts those, and `row(layer)` finds a layer of the model in them.
"""
from __future__ import annotations

import torch

from pie_policy import EngineConfig, Plan
from pie_policy.blocks import CPU


class PagedKV:
    def __init__(self, config: EngineConfig, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, staging_slots: int, layers: range | None = None):
        block = (2, config.block_size, kv_heads, head_dim)
        self.config, self.device = config, device
        self.layers = range(config.num_layers) if layers is None else layers
        self.gpu = torch.zeros((len(self.layers), config.num_gpu_blocks, *block), dtype=dtype, device=device)
        pin = device.type == "cuda"
        self.cpu = torch.zeros((len(self.layers), config.num_cpu_blocks, *block), dtype=dtype, pin_memory=pin)
        self.staging = torch.zeros((staging_slots, config.num_cpu_blocks, *block), dtype=dtype, device=device)

    def row(self, layer: int) -> int:
        """Where the model's `layer` is in the pools' first dimension."""
        return layer - self.layers.start

    def bind(self, plan: Plan) -> "BatchLayout":
        return BatchLayout(self, plan)


class BatchLayout:
    """Index tensors for one iteration, built once and used by every layer: where each sequence's blocks
    and new tokens live, and the padded shapes attention runs on."""

    def __init__(self, kv: PagedKV, plan: Plan):
        """Indices are built on the host and moved once, so no layer makes the host wait for the device."""
        self.kv, self.staging_slots = kv, plan.staging_slots
        bs = kv.config.block_size
        num_blocks = max(len(s.blocks) for s in plan.seqs)
        self.batch = len(plan.seqs)
        self.max_new = max(s.new_tokens for s in plan.seqs)
        # Per sequence and block: its slot (the row in the GPU pool or the staging slot) and which of the two.
        rows = torch.zeros((self.batch, num_blocks), dtype=torch.long)
        on_cpu = torch.zeros((self.batch, num_blocks), dtype=torch.bool)
        for i, seq in enumerate(plan.seqs):
            for j, block in enumerate(seq.blocks):
                on_cpu[i, j], rows[i, j] = block.tier == CPU, block.slot
        # Every new token: its sequence, its index among that sequence's new tokens, its position.
        seq_of = torch.tensor([i for i, s in enumerate(plan.seqs) for _ in range(s.new_tokens)])
        index = torch.tensor([t for s in plan.seqs for t in range(s.new_tokens)])
        positions = torch.tensor([s.cached_tokens + t for s in plan.seqs for t in range(s.new_tokens)])
        token_rows, token_on_cpu = rows[seq_of, positions // bs], on_cpu[seq_of, positions // bs]
        # The last new token of each sequence that samples: where its logits come from.
        ends = torch.cumsum(torch.tensor([s.new_tokens for s in plan.seqs]), 0) - 1
        sample_tokens = ends[[i for i, s in enumerate(plan.seqs) if s.samples]]
        # Causal and within the context; padded queries (position -1) see nothing and are dropped.
        context = torch.tensor([s.cached_tokens + s.new_tokens for s in plan.seqs])
        query_pos = torch.full((self.batch, self.max_new), -1, dtype=torch.long)
        query_pos[seq_of, index] = positions
        key_pos = torch.arange(num_blocks * bs)
        mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < context[:, None, None])

        to = kv.device
        self.seq_of, self.index, self.positions = seq_of.to(to), index.to(to), positions.to(to)
        self.sample_tokens = sample_tokens.to(to)
        self.mask = mask[:, None, :, :].to(to)  # [B, 1, max_new, keys] broadcast over heads
        self.rows_shape = rows.shape
        self.gpu_rows = rows.masked_fill(on_cpu, 0).flatten().to(to)  # CPU blocks and padding read row 0 ...
        self.cpu_blocks = on_cpu.flatten().nonzero().squeeze(1).to(to)  # ... and CPU blocks are replaced
        self.cpu_rows = rows[on_cpu].to(to)                              # from these staging rows
        gpu_tokens, cpu_tokens = (~token_on_cpu).nonzero().squeeze(1), token_on_cpu.nonzero().squeeze(1)
        self.token_targets = [(which, t.to(to), token_rows[t].to(to), (positions[t] % bs).to(to))
                              for which, t in ((0, gpu_tokens), (1, cpu_tokens)) if t.numel()]

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        staging = self.kv.staging[self.staging_slots[layer]] if self.staging_slots else None
        return self.kv.gpu[self.kv.row(layer)], staging

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the new tokens' K and V ([T, kv_heads, head_dim]) where their blocks live this layer."""
        pools = self.pools(layer)
        kv = torch.stack((k, v), dim=1)  # [T, 2, kv_heads, head_dim]
        for which, tokens, rows, offsets in self.token_targets:
            pools[which][rows, :, offsets] = kv[tokens]

    def gather(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's cached K and V, padded: two [B, num_blocks · block_size, kv_heads, head_dim]."""
        gpu, staging = self.pools(layer)
        b, n = self.rows_shape
        out = []
        for part in (0, 1):  # K, then V: gathering each from its strided view leaves it contiguous
            blocks = gpu[:, part].index_select(0, self.gpu_rows)
            if self.cpu_rows.numel():
                blocks[self.cpu_blocks] = staging[:, part].index_select(0, self.cpu_rows)
            out.append(blocks.view(b, n * gpu.shape[2], *gpu.shape[3:]))
        return out[0], out[1]
