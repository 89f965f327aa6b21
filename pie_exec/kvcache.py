"""The paged KV cache of the executor: a GPU pool, a CPU pool and the staging area, addressed through
pie_policy's block tables and plans.

Every pool holds blocks of shape [2, block_size, kv_heads, head_dim] (K then V), with the layer first:
GPU pool [L, G, ...], CPU pool [L, C, ...] (pinned on CUDA, so copies are asynchronous), staging
[slots, C, ...], each slot mirroring one layer of the CPU pool (a block keeps its CPU slot as its row).
A sequence's block on the GPU is read in place; a block on the CPU is read from the staging slot the plan
names for the layer, where the plan's prefetch put it, and new tokens written there go back to the CPU by
the plan's write-back. The GPU pool and the staging slots are two views of one device tensor of rows
(`device_rows`), so that a layer reads and writes both in one indexed pass: gathering staged blocks in a
second pass over the first's result made a 10 ms CPU layer 4.5 ms slower (decode 8 x 512, all staged),
a cost that grows with the staged share and that a paged GPU kernel does not have.

A pipeline stage holds the pools of its own layers only (`layers`, a slice of the model's): the pools'
first dimension counts those, and `row(layer)` finds a layer of the model in them.
"""
from __future__ import annotations

import torch

from pie_policy import EngineConfig, Plan
from pie_policy.blocks import CPU, GPU, BlockRef


class PagedKV:
    """The executor's KV memory: the GPU pool and the staging slots (views of one device tensor), and the
    CPU pool (pinned on a GPU host), laid out by block slot as the policy's block tables number them."""

    def __init__(self, config: EngineConfig, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, staging_slots: int, layers: range | None = None):
        block = (2, config.block_size, kv_heads, head_dim)
        self.config, self.device = config, device
        self.layers = range(config.num_layers) if layers is None else layers
        pool_rows = len(self.layers) * config.num_gpu_blocks
        self.device_rows = torch.zeros((pool_rows + staging_slots * config.num_cpu_blocks, *block), dtype=dtype,
                                       device=device)
        self.gpu = self.device_rows[:pool_rows].view(len(self.layers), config.num_gpu_blocks, *block)
        self.staging = self.device_rows[pool_rows:].view(staging_slots, config.num_cpu_blocks, *block)
        pin = device.type == "cuda"
        self.cpu = torch.zeros((len(self.layers), config.num_cpu_blocks, *block), dtype=dtype, pin_memory=pin)

    def row(self, layer: int) -> int:
        """Where the model's `layer` is in the pools' first dimension."""
        return layer - self.layers.start

    def first_rows(self, layer: int, staging_slot: int) -> tuple[int, int]:
        """The `device_rows` row of slot 0 of `layer`'s GPU pool and of staging slot `staging_slot`."""
        return self.row(layer) * self.config.num_gpu_blocks, len(self.gpu) * self.config.num_gpu_blocks \
            + staging_slot * self.config.num_cpu_blocks

    def bind(self, plan: Plan) -> "BatchLayout":
        return BatchLayout(self, plan)


class BatchLayout:
    """Index tensors for one iteration, built once and used by every layer: where each sequence's blocks
    and new tokens live, and the padded shapes attention runs on."""

    def __init__(self, kv: PagedKV, plan: Plan):
        """Indices are built on the host and moved once, so no layer makes the host wait for the device."""
        self.kv = kv
        bs = kv.config.block_size
        num_blocks = max(len(s.blocks) for s in plan.seqs)
        self.batch = len(plan.seqs)
        self.max_new = max(s.new_tokens for s in plan.seqs)
        # Per sequence and block: its slot (the row in the GPU pool or the staging slot) and which of the two.
        # Built as Python lists and converted once: element-wise tensor writes cost ~5 µs a block, which
        # made binding a decode batch of 16 x 1024 tokens take ~6 ms, an iteration-sized overhead.
        padding = [BlockRef(GPU, 0)] * num_blocks
        table = [[*s.blocks, *padding[len(s.blocks):]] for s in plan.seqs]
        rows = torch.tensor([[block.slot for block in blocks] for blocks in table], dtype=torch.long)
        on_cpu = torch.tensor([[block.tier == CPU for block in blocks] for blocks in table], dtype=torch.bool)
        # Every new token: its sequence, its index among that sequence's new tokens, its position.
        new_tokens = torch.tensor([s.new_tokens for s in plan.seqs])
        ends = torch.cumsum(new_tokens, 0) - 1
        seq_of = torch.repeat_interleave(torch.arange(self.batch), new_tokens)
        index = torch.arange(len(seq_of)) - (ends - new_tokens + 1)[seq_of]
        positions = torch.tensor([s.cached_tokens for s in plan.seqs])[seq_of] + index
        token_rows, token_on_cpu = rows[seq_of, positions // bs], on_cpu[seq_of, positions // bs]
        # The last new token of each sequence that samples: where its logits come from.
        sample_tokens = ends[[i for i, s in enumerate(plan.seqs) if s.samples]]
        # Causal and within the context; padded queries (position -1) see nothing and are dropped.
        context = torch.tensor([s.cached_tokens + s.new_tokens for s in plan.seqs])
        query_pos = torch.full((self.batch, self.max_new), -1, dtype=torch.long)
        query_pos[seq_of, index] = positions
        key_pos = torch.arange(num_blocks * bs)
        mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < context[:, None, None])

        # Per layer, the `device_rows` row of every block (padding reads slot 0) and of every new token.
        first = torch.tensor([kv.first_rows(layer, plan.staging_slots[layer] if plan.staging_slots else 0)
                              for layer in kv.layers])  # [L, 2]: the pool's and the staging slot's
        block_rows = rows.flatten() + first[:, on_cpu.flatten().long()]
        token_rows = token_rows + first[:, token_on_cpu.long()]

        to = kv.device
        self.seq_of, self.index, self.positions = seq_of.to(to), index.to(to), positions.to(to)
        self.sample_tokens = sample_tokens.to(to)
        self.mask = mask[:, None, :, :].to(to)  # [B, 1, max_new, keys] broadcast over heads
        self.rows_shape = rows.shape
        self.block_rows, self.token_rows, self.offsets = block_rows.to(to), token_rows.to(to), (positions % bs).to(to)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the new tokens' K and V ([T, kv_heads, head_dim]) where their blocks live this layer."""
        self.kv.device_rows[self.token_rows[self.kv.row(layer)], :, self.offsets] = torch.stack((k, v), dim=1)

    def gather(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's cached K and V, padded: two [B, num_blocks · block_size, kv_heads, head_dim]."""
        rows, (b, n) = self.block_rows[self.kv.row(layer)], self.rows_shape
        _, _, block_size, *head = self.kv.device_rows.shape
        # K, then V: gathering each from its strided view leaves it contiguous
        return tuple(self.kv.device_rows[:, part].index_select(0, rows).view(b, n * block_size, *head)
                     for part in (0, 1))
