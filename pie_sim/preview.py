"""Cost-model preview: how much KV a system can keep in CPU memory without stalling decode, and the
batch and throughput that buys — a closed-form steady state, before any simulation.

For B decoding sequences of context c (the trace's mean prompt + output, the most each holds), a CPU
share s of the KV lets B grow to min(max_seqs, pool / (1 - s) / (c · KV per token)). With layer-wise
prefetch, layer l+1's CPU-resident KV streams in (one contiguous copy per layer, as Pie's layer
swapping issues it) while layer l computes, so each layer costs max(compute, transfer) and an
iteration L of those plus the LM head. Newly written KV (one token per sequence) goes back
device→host in the shadow of the same layers and is ignored here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hwmodels import BatchShape, CapacityError, CostModel, GiB
from pie_policy.sizing import layer_and_stream, pooled_batch

SHARES = np.round(np.arange(0.0, 0.91, 0.01), 2)


@dataclass(frozen=True)
class PreviewRow:
    hw: str
    model: str
    weights_gib: float
    kv_pool_gib: float
    gpu_only_batch: int
    gpu_only_tok_s: float
    best_cpu_share: float
    pooled_batch: int
    pooled_tok_s: float

    @property
    def gain(self) -> float:
        return self.pooled_tok_s / self.gpu_only_tok_s


def decode_point(cm: CostModel, pool_bytes: int, context: int, share: float, max_seqs: int) -> tuple[int, float]:
    """(batch, decode tokens/s) at CPU share `share` in steady state; (0, 0) when nothing fits."""
    m, host = cm.model, cm.hw.host.memory_bytes
    batch = min(max_seqs, pooled_batch(m, pool_bytes, context, share),
                int(host / max(share, 1e-12) // (context * m.kv_bytes_per_token)))
    if batch == 0:
        return 0, 0.0
    layer, transfer = layer_and_stream(cm, batch, context, share)
    iteration = m.num_layers * max(layer, transfer) + cm.head_time(BatchShape.of(decodes=[context] * batch))
    return batch, batch / iteration


def preview(cm: CostModel, context: int, gpu_mem_util: float, max_seqs: int) -> tuple[PreviewRow, np.ndarray]:
    """The row for one system and model, and tokens/s over SHARES (for the plot)."""
    budget = cm.memory_budget(gpu_mem_util, max_seqs=max_seqs)
    points = [decode_point(cm, budget.kv_pool_bytes, context, s, max_seqs) for s in SHARES]
    curve = np.array([tok_s for _, tok_s in points])
    best = int(np.argmax(curve))
    row = PreviewRow(cm.hw.name, cm.model.name, budget.weight_bytes / GiB, budget.kv_pool_bytes / GiB,
                     points[0][0], points[0][1], float(SHARES[best]), points[best][0], points[best][1])
    return row, curve


def preview_all(pairs: list[CostModel], context: int, gpu_mem_util: float, max_seqs: int):
    """Rows and curves for every (system, model) that fits; the reasons for those that do not."""
    rows, curves, skipped = [], [], []
    for cm in pairs:
        try:
            row, curve = preview(cm, context, gpu_mem_util, max_seqs)
        except CapacityError as e:
            skipped.append(str(e))
            continue
        rows.append(row)
        curves.append(curve)
    return rows, curves, skipped
