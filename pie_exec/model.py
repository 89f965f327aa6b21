"""The decoder-only transformer the executor runs: OPT and Llama (Mistral's and, with biases on Q, K and V,
Qwen2's layers are Llama's), numerically as Hugging Face computes them.

One file, no framework (in the manner of gpt-fast's `model.py`). The ENGINE owns the layer loop, because it
interleaves KV-block copies between layers, so the model only exposes the pieces of a forward pass:

    h = model.embed(token_ids, positions)          # [T] token ids and positions -> [T, hidden]
    for layer, block in enumerate(model.layers):
        h = block(h, positions, attend_for(layer))  # attend(q, k, v) is the engine's paged attention
    logits = model.logits(h[sampled_rows])          # [N, hidden] -> [N, vocab]

Tokens are flattened: T is every new token of every sequence in the step, and `positions[t]` is token t's
position within its own sequence (0 for a prompt's first token). Nothing here knows about sequences,
batches or the KV cache; that is what the `attend` callable is for.

The `attend(q, k, v)` contract, for the T new tokens of one layer:

    q: [T, num_heads, head_dim]       k, v: [T, num_kv_heads, head_dim]      (RoPE already applied to q, k)
    returns [T, num_heads, head_dim]  = softmax(q · Kᵀ · head_dim**-0.5 + causal mask) · V per sequence,

where K and V are the cached context of token t's sequence followed by the new tokens up to t. The callable
stores k and v into the cache, handles grouped-query attention (query head i reads KV head
i // (num_heads // num_kv_heads)) and applies the scale itself: the model never pre-scales q (HF's OPT
multiplies q by head_dim**-0.5 before QKᵀ; the product is the same up to rounding). q, k and v may be
non-contiguous views; only their last dimension is guaranteed to have stride 1.

Layouts differ from HF's only in fusion: Q, K and V are one matmul (`wqkv`), as are Llama's gate and up
projections (`w13`), which is also how the cost model (hwmodels) counts the GEMMs. `pie_exec.weights` maps
HF checkpoints onto these parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hwmodels import ModelSpec

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]

OPT_POSITION_OFFSET = 2  # OPT's learned position table starts at row 2 (fairseq kept rows 0-1 for padding)
OPT_LAYER_NORM_EPS = 1e-5  # HF's OPT uses nn.LayerNorm's default; OPTConfig has no field for it


@dataclass(frozen=True)
class ArchDetails:
    """What a family needs beyond `ModelSpec`. Llama: RoPE base and RMSNorm epsilon. OPT needs nothing."""
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5


class RMSNorm(nn.Module):
    """Llama's RMSNorm, as HF computes it: normalise in FP32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Rotary(nn.Module):
    """RoPE tables for every position < max_context (HF's "default" rope type; rotate-half layout).

    cos and sin are computed in FP32 exactly as HF does (position · inv_freq, then cos/sin) and kept as
    non-persistent buffers; a model cast to FP16/BF16 casts them too, which is what HF does per call.
    One instance is shared by all blocks.
    """

    def __init__(self, head_dim: int, max_context: int, theta: float, device: torch.device | str):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
        freqs = torch.arange(max_context, device=device).float()[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: [T, heads, head_dim] rotated by the angle of each token's position."""
        cos = self.cos[positions].to(x.dtype)[:, None, :]
        sin = self.sin[positions].to(x.dtype)[:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class ReluMLP(nn.Module):
    """OPT: fc1 → ReLU → fc2, with biases."""

    def __init__(self, dim: int, ffn: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn, bias=True, dtype=dtype)
        self.w2 = nn.Linear(ffn, dim, bias=True, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.relu(self.w1(x)))


class SwiGLU(nn.Module):
    """Llama: down(silu(gate(x)) · up(x)); gate and up fused into one matmul `w13` (gate rows first)."""

    def __init__(self, dim: int, ffn: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.ffn = ffn
        self.w13 = nn.Linear(dim, 2 * ffn, bias=False, dtype=dtype)
        self.w2 = nn.Linear(ffn, dim, bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.ffn, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    """One pre-norm decoder layer: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, spec: ModelSpec, details: ArchDetails, dtype: torch.dtype | None = None):
        super().__init__()
        opt = spec.family == "opt"
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_size, self.kv_size = spec.num_heads * spec.head_dim, spec.kv_dim
        h = spec.hidden_size
        norm = ((lambda: nn.LayerNorm(h, eps=OPT_LAYER_NORM_EPS, dtype=dtype)) if opt
                else (lambda: RMSNorm(h, details.rms_norm_eps, dtype=dtype)))
        self.attention_norm = norm()
        self.wqkv = nn.Linear(h, self.q_size + 2 * self.kv_size, bias=opt or spec.qkv_bias, dtype=dtype)
        self.wo = nn.Linear(self.q_size, h, bias=opt, dtype=dtype)
        self.ffn_norm = norm()
        self.mlp = ReluMLP(h, spec.ffn_size, dtype) if opt else SwiGLU(h, spec.ffn_size, dtype)
        self.rope: Rotary | None = None  # set by Transformer for Llama (shared by all blocks)

    def forward(self, h: Tensor, positions: Tensor, attend: Attend) -> Tensor:
        """h: [T, hidden]; positions: [T]; attend: the engine's attention for this layer (see module doc)."""
        T = h.shape[0]
        q, k, v = self.wqkv(self.attention_norm(h)).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        out = attend(q, k, v)
        h = h + self.wo(out.reshape(T, self.q_size))
        return h + self.mlp(self.ffn_norm(h))


class Transformer(nn.Module):
    """OPT or Llama built from a `ModelSpec`. Parameters are left UNINITIALISED (torch.empty, no init
    pass, so building a 70B skeleton is instant): fill them with `pie_exec.weights.random_transformer`
    or `pie_exec.weights.load_hf_folder`."""

    def __init__(self, spec: ModelSpec, details: ArchDetails = ArchDetails(),
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        if spec.family not in ("opt", "llama"):
            raise ValueError(f"model {spec.name}: unknown family {spec.family!r} (expected 'opt' or 'llama')")
        if spec.hidden_size % spec.num_heads or spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"model {spec.name}: hidden_size {spec.hidden_size}, num_heads {spec.num_heads} "
                             f"and num_kv_heads {spec.num_kv_heads} do not divide evenly")
        if spec.moe:
            raise ValueError(f"model {spec.name}: mixtures of experts ({spec.num_experts} experts) are not implemented")
        if spec.family == "opt" and spec.num_kv_heads != spec.num_heads:
            raise ValueError(f"model {spec.name}: OPT has no grouped-query attention "
                             f"(num_kv_heads {spec.num_kv_heads} != num_heads {spec.num_heads})")
        self.spec, self.details = spec, details
        h = spec.hidden_size
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(spec.vocab_size, h, dtype=dtype)
            self.pos_embeddings = (nn.Embedding(spec.max_context + OPT_POSITION_OFFSET, h, dtype=dtype)
                                   if spec.family == "opt" else None)
            self.layers = nn.ModuleList(Block(spec, details, dtype) for _ in range(spec.num_layers))
            self.norm = (nn.LayerNorm(h, eps=OPT_LAYER_NORM_EPS, dtype=dtype) if spec.family == "opt"
                         else RMSNorm(h, details.rms_norm_eps, dtype=dtype))
            self.output = None if spec.tied_embeddings else nn.Linear(h, spec.vocab_size, bias=False, dtype=dtype)
        self.to_empty(device=device)
        if spec.family == "llama":
            rope = Rotary(spec.head_dim, spec.max_context, details.rope_theta, device)
            for block in self.layers:
                block.rope = rope

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def embed(self, token_ids: Tensor, positions: Tensor) -> Tensor:
        """[T] token ids and their positions (each < max_context) -> [T, hidden]."""
        h = self.tok_embeddings(token_ids)
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings(positions + OPT_POSITION_OFFSET)
        return h

    def logits(self, h: Tensor) -> Tensor:
        """[N, hidden] final hidden states -> [N, vocab] logits (in the model's dtype)."""
        h = self.norm(h)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(h, weight)
