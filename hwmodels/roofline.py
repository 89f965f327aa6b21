"""Compute time from datasheet figures: a roofline per part of a layer, for one GPU's share of it when
`tp` GPUs split the layer (tensor parallelism: 1/tp of the heads and of the FFN each).

A layer is the sum of its parts, each the longer of its FLOPs at a share of peak and its HBM bytes at a
share of the bandwidth (summing, rather than one roofline over the layer, keeps decode's memory-bound
attention from hiding under compute-bound GEMMs):
- GEMMs (QKV, output, MLP): FLOPs at `flops_efficiency · T / (T + gemm_ridge_tokens)` of peak for T
  tokens (few rows keep the tensor cores from reaching their rate), weights and activations at
  `hbm_efficiency` of the bandwidth;
- element-wise kernels (two norms, rotary, activation, residual add): their bytes at
  `elementwise_efficiency` (not charged where the entry has none);
- decode attention: KV read at `decode_attention_efficiency` of the bandwidth; prefill attention: its
  (query, key) pairs at `prefill_attention_efficiency` of peak (each defaults to the GEMMs' share);
- `layer_overhead` once a layer (kernel launches and the fixed latency of its small kernels);
- with tp > 1, two all-reduces of the layer's hidden states (after attention, after the MLP), each
  `all_reduce_latency + 2(tp-1)/tp · bytes / all_reduce_bandwidth` (ring all-reduce over the server's
  GPU interconnect).
In a mixture of experts the GEMMs read only the experts the batch's tokens are routed to (expected under
uniform routing, `ModelSpec.expert_bytes_read`) and compute those of each token's top-k.
Outside the layers: the LM head as a GEMM, then the engine's per-iteration host time
(`iteration_overhead + iteration_overhead_per_sequence · sequences`: scheduling, input preparation,
sampling). Copies in flight (bytes/s over the host link, shared by the tp GPUs) take `compute_contention`
of themselves out of every memory-bound part's bandwidth.
"""
from __future__ import annotations

from .batch import BatchShape
from .hardware import HardwareSpec
from .models import ModelSpec


def elementwise_bytes_per_token(model: ModelSpec, tp: int) -> float:
    """HBM bytes one token's element-wise kernels move on each of `tp` GPUs: two norms (read and write
    the hidden state) and the residual add (two in, one out) on the whole hidden state on every GPU;
    rotary (Llama: Q and K in and out) and the activation (SwiGLU: gate and up in, one out; ReLU: one in,
    one out) on the GPU's share of the heads and of the FFN."""
    h, kv, f = model.hidden_size, model.kv_dim, model.ffn_size
    whole = 2 * 2 * h + 3 * h
    split = (2 * (h + kv) if model.family == "llama" else 0) + (3 if model.gated_mlp else 2) * f
    return (whole + split / tp) * model.dtype_bytes


class Roofline:
    """One GPU's share of every layer (see the module's docstring); `hw` is the per-GPU entry."""

    def __init__(self, hw: HardwareSpec, model: ModelSpec, tp: int = 1):
        self.hw, self.model, self.tp = hw, model, tp
        gpu = hw.gpu
        self._gemm_rate = gpu.peak_flops * gpu.flops_efficiency
        self._ridge = gpu.gemm_ridge_tokens
        self._hbm_rate = gpu.hbm_bandwidth * gpu.hbm_efficiency
        self._elementwise_rate = gpu.hbm_bandwidth * gpu.elementwise_efficiency if gpu.elementwise_efficiency else 0.0
        self._decode_rate = gpu.hbm_bandwidth * (gpu.decode_attention_efficiency or gpu.hbm_efficiency)
        self._prefill_rate = gpu.peak_flops * (gpu.prefill_attention_efficiency or gpu.flops_efficiency)
        # A layer's FLOPs and bytes are linear in the batch's sums (see BatchShape): read the coefficients
        # off the model once, so costing an iteration is a few multiplications (exact: they are integers).
        empty, token = BatchShape(), BatchShape(decode_tokens=1)
        self._linear_flops = model.linear_flops(token) / tp
        self._weight_bytes = model.linear_bytes(empty) / tp
        self._experts_read = model.expert_bytes_read if model.moe else None  # not linear in the tokens
        self._token_bytes = (model.linear_bytes(token) - model.linear_bytes(empty)) / tp
        self._elementwise_bytes = elementwise_bytes_per_token(model, tp) if self._elementwise_rate else 0.0
        self._pair_flops = model.attention_flops(BatchShape(attended_pairs=1)) / tp
        self._read_bytes = model.attention_bytes(BatchShape(kv_tokens_read=1)) / tp
        self._new_bytes = model.attention_bytes(token) / tp
        sample = BatchShape(sampled_tokens=1)
        self._head_flops = model.head_flops(sample) / tp
        self._head_bytes = model.head_bytes(empty) / tp
        self._sample_bytes = (model.head_bytes(sample) - model.head_bytes(empty)) / tp
        self._message_bytes = model.hidden_size * model.dtype_bytes  # one token's hidden state
        self._per_batch_size: dict[int, tuple[float, float]] = {}  # decode_time's parts per batch size

    # ---- the parts of a layer
    def gemm_time(self, tokens: int, copy_bandwidth: float = 0.0) -> float:
        """The layer's matrix products over `tokens` tokens."""
        return max(self._linear_flops * (tokens + self._ridge) / self._gemm_rate,
                   (self._weights_read(tokens) + self._token_bytes * tokens) / self._rate(self._hbm_rate, copy_bandwidth))

    def _weights_read(self, tokens: int) -> float:
        """Weight bytes a layer's GEMMs read for `tokens` tokens: all of them, but in a mixture of experts
        only the experts the tokens are expected to be routed to (`ModelSpec.expert_bytes_read`), each GPU
        holding 1/tp of every expert."""
        if self._experts_read is None:
            return self._weight_bytes
        return self._weight_bytes + self._experts_read(tokens) / self.tp

    def elementwise_time(self, tokens: int, copy_bandwidth: float = 0.0) -> float:
        if not self._elementwise_rate:
            return 0.0
        return self._elementwise_bytes * tokens / self._rate(self._elementwise_rate, copy_bandwidth)

    def attention_time(self, batch: BatchShape, copy_bandwidth: float = 0.0) -> float:
        """Decode attention (bandwidth bound) plus prefill attention (FLOPs bound): separate kernels."""
        decode = batch.decode_kv_tokens
        seconds = 0.0
        if batch.decode_tokens:
            seconds += max(self._pair_flops * decode / self._gemm_rate,
                           (self._read_bytes * decode + self._new_bytes * batch.decode_tokens)
                           / self._rate(self._decode_rate, copy_bandwidth))
        if batch.prefill_tokens or batch.attended_pairs > decode:
            seconds += max(self._pair_flops * (batch.attended_pairs - decode) / self._prefill_rate,
                           (self._read_bytes * (batch.kv_tokens_read - decode) + self._new_bytes * batch.prefill_tokens)
                           / self._rate(self._hbm_rate, copy_bandwidth))
        return seconds

    def all_reduce_time(self, tokens: int) -> float:
        """One all-reduce of `tokens` tokens' hidden states among the tp GPUs (0 for one GPU)."""
        if self.tp == 1:
            return 0.0
        server = self.hw.server
        assert server.all_reduce_bandwidth is not None  # check_tensor_parallel refuses tp > 1 without it
        return server.all_reduce_latency + 2 * (self.tp - 1) / self.tp * tokens * self._message_bytes \
            / server.all_reduce_bandwidth

    def kernel_time(self, batch: BatchShape, copy_bandwidth: float = 0.0) -> float:
        """A layer's own kernels, all-reduces left out: the part copies in flight slow down."""
        tokens = batch.tokens
        return (self.gemm_time(tokens, copy_bandwidth) + self.elementwise_time(tokens, copy_bandwidth)
                + self.attention_time(batch, copy_bandwidth) + self.hw.gpu.layer_overhead)

    def _rate(self, rate: float, copy_bandwidth: float) -> float:
        """`rate` less what copies at `copy_bandwidth` bytes/s (over all tp GPUs) take from each GPU's HBM."""
        if not copy_bandwidth:
            return rate
        left = rate - self.hw.link.compute_contention * copy_bandwidth / self.tp
        if left <= 0:
            raise ValueError(f"copies at {copy_bandwidth:.3g} B/s leave no HBM bandwidth to compute")
        return left

    # ---- what the cost model asks
    def layer_time(self, batch: BatchShape, copy_bandwidth: float = 0.0) -> float:
        return self.dense_time(batch.tokens, copy_bandwidth) + self.attention_time(batch, copy_bandwidth)

    def dense_time(self, tokens: int, copy_bandwidth: float = 0.0) -> float:
        """Every part of a layer but attention: what depends on the token count alone."""
        return (self.gemm_time(tokens, copy_bandwidth) + self.elementwise_time(tokens, copy_bandwidth)
                + self.hw.gpu.layer_overhead + 2 * self.all_reduce_time(tokens))

    def head_time(self, batch: BatchShape) -> float:
        """The LM head over the sampled tokens and the engine's per-iteration host time."""
        return self._head(batch.sampled_tokens)

    def _head(self, sampled: int) -> float:
        gpu = self.hw.gpu
        head = max(self._head_flops * (sampled + self._ridge) / self._gemm_rate,
                   (self._head_bytes + self._sample_bytes * sampled) / self._hbm_rate)
        return head + gpu.iteration_overhead + gpu.iteration_overhead_per_sequence * sampled

    def decode_time(self, sequences: int, attended: int) -> float:
        """A whole decode iteration of `sequences` sequences attending to `attended` positions in all, with
        the parts that depend on the batch size alone computed once per size."""
        known = self._per_batch_size.get(sequences)
        if known is None:
            known = self._per_batch_size[sequences] = (self.dense_time(sequences), self._head(sequences))
        rest, head = known
        attention = max(self._pair_flops * attended / self._gemm_rate,
                        (self._read_bytes * attended + self._new_bytes * sequences) / self._decode_rate)
        return self.model.num_layers * (rest + attention) + head
