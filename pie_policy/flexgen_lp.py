"""FlexGen's offline placement policy (Sheng et al., ICML 2023, §4.2), over GPU and CPU memory only.

FlexGen runs a *block* of `num_gpu_batches` GPU batches of `gpu_batch_size` sequences layer by layer
(the zig-zag schedule): a layer's weights are loaded once and reused by every GPU batch of the block,
while the next layer's weights and the next batch's KV cache and activations stream in and finished
outputs stream out. For a fixed block, a linear program picks the shares wg, cg, hg of the weights, KV
cache and activations kept in HBM (the rest live in CPU memory) that minimise the block's generation
time; the outer search enumerates block shapes and keeps the highest throughput. Disk, attention on the
CPU and compression are left out.

Per layer, with B = gpu_batch_size · num_gpu_batches sequences, prompt s, n generated tokens, L layers,
W one layer's weight bytes, k the KV bytes per token and layer, a = hidden_size · dtype_bytes and
c = s + ⌊n/2⌋ the mean cached context of a decode step (FlexGen's s + n/2):

    prefill  T_p >= num_gpu_batches · layer_time(gpu_batch_size prompts of s tokens)
             T_p >= in_p / h2d,   in_p  = (1-wg)·W + (1-hg)·B·s·a         weights and inputs
             T_p >= out_p / d2h,  out_p = (1-cg)·B·s·k + (1-hg)·B·s·a     new KV and outputs
             T_p >= (in_p + out_p) / bidirectional                       both directions at once
    decode   T_g >= num_gpu_batches · layer_time(gpu_batch_size decodes at context c)
             T_g >= in_g / h2d,   in_g  = (1-wg)·W + (1-cg)·B·c·k + (1-hg)·B·a
             T_g >= out_g / d2h,  out_g = (1-cg)·B·k + (1-hg)·B·a
             T_g >= (in_g + out_g) / bidirectional
    minimise L·(T_p + (n-1)·T_g)
    HBM      wg·L·W + cg·K + hg·A + E + act + 2·[(1-wg)·W + (1-cg)·gpu_batch_size·(s+n)·k]
                 <= gpu_mem_util · HBM
    host     (1-wg)·L·W + (1-cg)·K + (1-hg)·A <= host memory

K = L·B·(s+n)·k is the block's whole KV cache, A = B·s·a one layer's activations of the block, E the
embeddings and LM head (always in HBM: the head runs every step), act the cost model's working set of a
forward pass of one GPU batch, and the bracket the double buffers that stream the offloaded part of the
next layer's weights and of the next batch's KV in. As in FlexGen, copies overlap compute perfectly and
cost their bytes at the link's bandwidth (per-call latency is small next to a layer's time), and compute
ignores the HBM bandwidth the copies take (the simulator charges it). Among equally fast placements the
one that moves the fewest bytes wins, so a model that fits stays entirely in HBM.

Throughput = B·n / (L·(T_p + (n-1)·T_g) + n · num_gpu_batches · head_time(gpu_batch_size)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from hwmodels import BatchShape, CapacityError, CostModel

GIB = 1024**3
DEFAULT_GPU_BATCH_SIZES = tuple(2**i for i in range(11))  # 1 … 1024, powers of two as in FlexGen
DEFAULT_NUM_GPU_BATCHES = tuple(2**i for i in range(7))   # 1 … 64
BOUNDS = ("compute", "h2d", "d2h", "bidirectional")      # order of the rows of a layer's time


@dataclass(frozen=True)
class FlexGenPlacement:
    """FlexGen's plan for one block: where weights, KV cache and activations live, and what it predicts.
    Times are seconds, sizes bytes, throughput generated tokens per second."""
    gpu_batch_size: int
    num_gpu_batches: int
    wg: float                   # share of every layer's weights in HBM (the rest in CPU memory)
    cg: float                   # share of the KV cache in HBM
    hg: float                   # share of the activations in HBM
    prefill_layer_time: float   # one layer over the block's prompts
    decode_layer_time: float    # one layer of one decode step of the block
    decode_bound: str           # which of BOUNDS sets decode_layer_time
    total_time: float           # prefill and n-1 decode steps over every layer, plus the LM head
    throughput: float
    gpu_bytes: int
    cpu_bytes: int

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches


def _offloaded(weights: float = 0, cache: float = 0, acts: float = 0) -> np.ndarray:
    """Bytes of which the shares 1-wg, 1-cg, 1-hg live in CPU memory, as coefficients over (1, wg, cg, hg)."""
    return np.array([weights + cache + acts, -weights, -cache, -acts], dtype=float)


def _time_rows(compute: float, copy_in: np.ndarray, copy_out: np.ndarray, cm: CostModel) -> np.ndarray:
    """The lower bounds on a layer's time (rows in BOUNDS order) over (1, wg, cg, hg)."""
    link = cm.hw.link
    return np.stack([np.array([compute, 0, 0, 0]), copy_in / link.h2d_bandwidth,
                     copy_out / link.d2h_bandwidth, (copy_in + copy_out) / link.bidirectional_bandwidth])


def solve(cost_model: CostModel, prompt_len: int, gen_len: int, gpu_batch_size: int, num_gpu_batches: int,
          gpu_mem_util: float = 0.9) -> FlexGenPlacement:
    """The fastest placement of one block shape. Raises `CapacityError` (a ValueError) if none fits."""
    m, hw = cost_model.model, cost_model.hw
    s, n, gbs, ngb = prompt_len, gen_len, gpu_batch_size, num_gpu_batches
    if s < 1 or n < 1 or s + n > m.max_context:
        raise ValueError(f"need prompt_len >= 1, gen_len >= 1 and their sum within {m.name}'s context "
                         f"{m.max_context}, got {s} + {n}")
    if gbs < 1 or ngb < 1:
        raise ValueError(f"need gpu_batch_size and num_gpu_batches >= 1, got {gbs} and {ngb}")
    if not 0 < gpu_mem_util <= 1:
        raise ValueError(f"gpu_mem_util must be in (0, 1], got {gpu_mem_util}")

    B, L, W, k = gbs * ngb, m.num_layers, m.layer_weight_bytes, m.kv_bytes_per_token_layer
    a, c = m.hidden_size * m.dtype_bytes, s + n // 2
    in_p, out_p = _offloaded(weights=W, acts=B * s * a), _offloaded(cache=B * s * k, acts=B * s * a)
    in_g, out_g = _offloaded(weights=W, cache=B * c * k, acts=B * a), _offloaded(cache=B * k, acts=B * a)
    prefill = _time_rows(ngb * cost_model.layer_time(BatchShape.of(prefills=[(s, 0)] * gbs)), in_p, out_p,
                         cost_model)
    decode = _time_rows(ngb * cost_model.layer_time(BatchShape.of(decodes=[c] * gbs)), in_g, out_g,
                        cost_model)
    kv, acts = L * B * (s + n) * k, B * s * a
    fixed = m.weight_bytes - L * W + m.activation_bytes(gbs * s, gbs)
    gpu = np.array([fixed, L * W, kv, acts], dtype=float) + 2 * _offloaded(weights=W, cache=gbs * (s + n) * k)
    cpu = _offloaded(weights=L * W, cache=kv, acts=acts)
    usable, host = int(hw.gpu.hbm_bytes * gpu_mem_util), hw.host.memory_bytes

    # Variables (wg, cg, hg, T_p/compute_p, T_g/compute_g): every row is scaled to order one so that
    # the solver's absolute tolerances (1e-7) mean the same for microseconds and for bytes.
    scale_p, scale_g = prefill[0, 0], decode[0, 0]
    A, b = [], []
    for rows, scale, t in ((prefill, scale_p, [-1, 0]), (decode, scale_g, [0, -1])):
        for row in rows[1:]:  # row · (1, wg, cg, hg) <= T, the compute row being T's lower bound
            A.append([*row[1:] / scale, *t])
            b.append(-row[0] / scale)
    A += [[*gpu[1:] / usable, 0, 0], [*cpu[1:] / host, 0, 0]]
    b += [1 - gpu[0] / usable, 1 - cpu[0] / host]
    time = np.array([0, 0, 0, scale_p, (n - 1) * scale_g])
    time /= time.sum()
    bounds = [(0, 1)] * 3 + [(1, None)] * 2
    from scipy.optimize import linprog  # here: importing scipy costs every command ~0.5 s at start-up

    fastest = linprog(time, A_ub=A, b_ub=b, bounds=bounds, method="highs")
    if fastest.status == 2:
        raise CapacityError(_why(cost_model, s, n, gbs, ngb, gpu_mem_util, gpu, usable, kv, acts))
    if fastest.status != 0:
        raise RuntimeError(f"linprog failed on {m.name}/{hw.name}: {fastest.message}")
    # Ties are common (compute-bound blocks do not care where data lives): keep the fewest bytes moving.
    moved = in_p + out_p + (n - 1) * (in_g + out_g)
    fewest = linprog([*moved[1:] / np.abs(moved[1:]).sum(), 0, 0], A_ub=A + [time],
                     b_ub=b + [fastest.fun * (1 + 1e-9)], bounds=bounds, method="highs")
    if fewest.status != 0:
        raise RuntimeError(f"linprog failed on {m.name}/{hw.name}: {fewest.message}")

    wg, cg, hg = np.clip(fewest.x[:3], 0, 1) + 0.0  # + 0.0 turns -0.0 into 0.0
    point = np.array([1, wg, cg, hg])
    t_p, t_g = prefill @ point, decode @ point
    head = n * ngb * cost_model.head_time(BatchShape(sampled_tokens=gbs))
    total = L * (t_p.max() + (n - 1) * t_g.max()) + head
    return FlexGenPlacement(gbs, ngb, float(wg), float(cg), float(hg), float(t_p.max()), float(t_g.max()),
                            BOUNDS[int(t_g.argmax())], float(total), B * n / float(total),
                            round(gpu @ point), round(cpu @ point))


def _why(cm: CostModel, s: int, n: int, gbs: int, ngb: int, util: float, gpu: np.ndarray, usable: int,
         kv: int, acts: int) -> str:
    """Which memory refuses the block: HBM alone (its floor with everything offloaded), or both tiers."""
    m, hw = cm.model, cm.hw
    where = f"{m.name} on {hw.name} cannot hold a block of {ngb} x {gbs} sequences of {s} + {n} tokens"
    hbm = f"{_gib(usable)} usable HBM ({util:g} of {_gib(hw.gpu.hbm_bytes)})"
    floor = gpu[0] + np.minimum(gpu[1:], 0).sum()
    if floor > usable:
        return (f"{where}: HBM is the binding constraint, with everything offloaded it still needs "
                f"{_gib(floor)} (embeddings and LM head, working activations, streaming buffers) > {hbm}")
    return (f"{where}: GPU + CPU memory is the binding constraint, weights {_gib(m.weight_bytes)} + KV cache "
            f"{_gib(kv)} + activations {_gib(acts)} exceed {hbm}, less its buffers, + "
            f"{_gib(hw.host.memory_bytes)} host memory")


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.4g} GiB"


def search(cost_model: CostModel, prompt_len: int, gen_len: int, gpu_mem_util: float = 0.9,
           gpu_batch_sizes: Iterable[int] = DEFAULT_GPU_BATCH_SIZES,
           num_gpu_batches: Iterable[int] = DEFAULT_NUM_GPU_BATCHES) -> FlexGenPlacement:
    """FlexGen's outer search: the highest-throughput feasible block shape and its placement. Raises
    `CapacityError` (a ValueError) naming the binding memory for the smallest block if none fits."""
    gpu_batch_sizes, num_gpu_batches = sorted(gpu_batch_sizes), sorted(num_gpu_batches)
    if not gpu_batch_sizes or not num_gpu_batches:
        raise ValueError("the search needs at least one gpu batch size and one number of gpu batches")
    best, refusal = None, None
    for gbs in gpu_batch_sizes:
        for ngb in num_gpu_batches:
            try:
                plan = solve(cost_model, prompt_len, gen_len, gbs, ngb, gpu_mem_util)
            except CapacityError as e:
                refusal = refusal or e
                break  # more GPU batches only need more memory
            if best is None or plan.throughput > best.throughput:
                best = plan
    if best is None:
        raise refusal
    return best
