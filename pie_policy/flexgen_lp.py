"""FlexGen's offline placement policy (Sheng et al., ICML 2023, §4.2) over GPU, CPU and, where the hardware
has one (its `[disk]`), disk.

FlexGen runs a *block* of `num_gpu_batches` GPU batches of `gpu_batch_size` sequences layer by layer
(the zig-zag schedule): a layer's weights are loaded once and reused by every GPU batch of the block,
while the next layer's weights and the next batch's KV cache and activations stream in and finished
outputs stream out. For a fixed block, a linear program picks the shares of the weights, KV cache and
activations kept in HBM (wg, cg, hg) and on disk (wd, cd, hd; the rest, wc = 1 - wg - wd and so on, in CPU
memory) that minimise the block's generation time; the outer search enumerates block shapes and keeps the
highest throughput. As in FlexGen, the disk is reached through CPU memory: data on disk is read into CPU
memory and copied on to the GPU, so it is bounded by the disk's read bandwidth *and* takes the host→GPU
link; data written to disk goes GPU → CPU → disk. Without a disk the disk shares are not variables: the
two-tier program. Attention on the CPU and compression are left out.

Per layer, with B = gpu_batch_size · num_gpu_batches sequences, prompt s, n generated tokens, L layers,
W one layer's weight bytes, k the KV bytes per token and layer, a = hidden_size · dtype_bytes and
c = s + ⌊n/2⌋ the mean cached context of a decode step (FlexGen's s + n/2):

    prefill  T_p >= num_gpu_batches · layer_time(gpu_batch_size prompts of s tokens)
             T_p >= in_p / h2d,   in_p  = (1-wg)·W + (1-hg)·B·s·a         weights and inputs
             T_p >= out_p / d2h,  out_p = (1-cg)·B·s·k + (1-hg)·B·s·a     new KV and outputs
             T_p >= (in_p + out_p) / bidirectional                       both directions at once
             T_p >= (wd·W + hd·B·s·a) / disk_read                         what comes from disk
             T_p >= (cd·B·s·k + hd·B·s·a) / disk_write                    what goes to disk
    decode   T_g >= num_gpu_batches · layer_time(gpu_batch_size decodes at context c)
             T_g >= in_g / h2d,   in_g  = (1-wg)·W + (1-cg)·B·c·k + (1-hg)·B·a
             T_g >= out_g / d2h,  out_g = (1-cg)·B·k + (1-hg)·B·a
             T_g >= (in_g + out_g) / bidirectional
             T_g >= (wd·W + cd·B·c·k + hd·B·a) / disk_read
             T_g >= (cd·B·k + hd·B·a) / disk_write
    minimise L·(T_p + (n-1)·T_g)
    HBM      wg·L·W + cg·K + hg·A + E + act + 2·[(1-wg)·W + (1-cg)·gpu_batch_size·(s+n)·k]
                 <= gpu_mem_util · HBM
    CPU      wc·L·W + cc·K + hc·A + 2·[wd·W + cd·gpu_batch_size·(s+n)·k] <= CPU memory
    disk     wd·L·W + cd·K + hd·A <= disk capacity
    shares   wg + wd <= 1,  cg + cd <= 1,  hg + hd <= 1

K = L·B·(s+n)·k is the block's whole KV cache, A = B·s·a one layer's activations of the block, E the
embeddings and LM head (always in HBM: the head runs every step), act the cost model's working set of a
forward pass of one GPU batch, and the brackets the double buffers through which the offloaded part of the
next layer's weights and of the next batch's KV streams: in HBM for all of it, in CPU memory for the part
that comes from disk. As in FlexGen, copies overlap compute and one another perfectly (the disk's reads
and writes are separate streams, as are the link's directions) and cost their bytes at the bandwidth
(per-call latency is small next to a layer's time), and compute ignores the HBM bandwidth the copies take
(the simulator charges it). Among equally fast placements the one that moves the fewest bytes wins, so a
model that fits stays entirely in HBM, and the disk holds only what neither HBM nor CPU memory can.

Throughput = B·n / (L·(T_p + (n-1)·T_g) + n · num_gpu_batches · head_time(gpu_batch_size)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from hwmodels import BatchShape, CapacityError, CostModel, GiB

DEFAULT_GPU_BATCH_SIZES = tuple(2**i for i in range(11))  # 1 … 1024, powers of two as in FlexGen
DEFAULT_NUM_GPU_BATCHES = tuple(2**i for i in range(7))   # 1 … 64
# The rows of a layer's time, in order; the last two only where there is a disk.
BOUNDS = ("compute", "h2d", "d2h", "bidirectional", "disk-read", "disk-write")
SHARES = ("wg", "cg", "hg", "wd", "cd", "hd")  # the LP's columns after the constant: in HBM, then on disk


@dataclass(frozen=True)
class FlexGenPlacement:
    """FlexGen's plan for one block: where weights, KV cache and activations live, and what it predicts.
    Times are seconds, sizes bytes, throughput generated tokens per second."""
    gpu_batch_size: int
    num_gpu_batches: int
    wg: float                   # share of every layer's weights in HBM
    cg: float                   # share of the KV cache in HBM
    hg: float                   # share of the activations in HBM
    prefill_layer_time: float   # one layer over the block's prompts
    decode_layer_time: float    # one layer of one decode step of the block
    decode_bound: str           # which of BOUNDS sets decode_layer_time
    total_time: float           # prefill and n-1 decode steps over every layer, plus the LM head
    throughput: float
    gpu_bytes: int
    cpu_bytes: int
    wd: float = 0.0             # shares on disk (what is in neither HBM nor on disk is in CPU memory)
    cd: float = 0.0
    hd: float = 0.0
    disk_bytes: int = 0

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def cpu_shares(self) -> tuple[float, float, float]:
        """(wc, cc, hc): the shares of weights, KV cache and activations in CPU memory."""
        wc, cc, hc = (max(0.0, 1 - g - d) for g, d in ((self.wg, self.wd), (self.cg, self.cd), (self.hg, self.hd)))
        return wc, cc, hc


def check_shares(on_gpu: Iterable[float], on_disk: Iterable[float]) -> None:
    """Refuse shares of (weights, KV cache, activations) that are negative or place more than all of a kind."""
    on_gpu, on_disk = list(on_gpu), list(on_disk)
    if not all(g >= 0 and d >= 0 and g + d <= 1 + 1e-12 for g, d in zip(on_gpu, on_disk)):
        raise ValueError(f"shares must be >= 0 with each kind's HBM + disk <= 1, got in HBM {on_gpu}, "
                         f"on disk {on_disk}")


def _offloaded(weights: float = 0, cache: float = 0, acts: float = 0) -> np.ndarray:
    """Bytes of which the shares 1-wg, 1-cg, 1-hg live off the GPU (in CPU memory or on disk), as
    coefficients over (1, *SHARES)."""
    return np.array([weights + cache + acts, -weights, -cache, -acts, 0, 0, 0], dtype=float)


def _on_disk(weights: float = 0, cache: float = 0, acts: float = 0) -> np.ndarray:
    """Bytes of which the shares wd, cd, hd live on disk, over (1, *SHARES)."""
    return np.array([0, 0, 0, 0, weights, cache, acts], dtype=float)


@dataclass(frozen=True)
class _Costs:
    """One block shape on one system, as coefficients over (1, *SHARES) cut to the system's tiers (without
    a disk: the constant and the shares in HBM)."""
    prefill: np.ndarray   # rows in BOUNDS order: the lower bounds on a layer's time, seconds
    decode: np.ndarray
    tiers: tuple[tuple[str, np.ndarray, int], ...]  # (name, bytes used, capacity): HBM, CPU memory[, disk]
    moved: np.ndarray     # bytes every copy of the block moves
    head: float           # seconds of the LM head over the whole generation

    @property
    def shares(self) -> int:
        """How many shares are variables: 3, or 6 with a disk."""
        return self.moved.size - 1


def _time_rows(compute: float, copy_in: np.ndarray, copy_out: np.ndarray, disk_in: np.ndarray,
               disk_out: np.ndarray, cm: CostModel) -> np.ndarray:
    """The lower bounds on a layer's time (rows in BOUNDS order) over (1, *SHARES)."""
    link, disk = cm.hw.link, cm.hw.disk
    rows = [np.eye(1, 1 + len(SHARES))[0] * compute, copy_in / link.h2d_bandwidth,
            copy_out / link.d2h_bandwidth, (copy_in + copy_out) / link.bidirectional_bandwidth]
    if disk is not None:
        rows += [disk_in / disk.read_bandwidth, disk_out / disk.write_bandwidth]
    return np.stack(rows)


def _costs(cost_model: CostModel, s: int, n: int, gbs: int, ngb: int, gpu_mem_util: float,
           cpu_mem_bytes: int | None) -> _Costs:
    m, hw = cost_model.model, cost_model.hw
    if s < 1 or n < 1 or s + n > m.max_context:
        raise ValueError(f"need prompt_len >= 1, gen_len >= 1 and their sum within {m.name}'s context "
                         f"{m.max_context}, got {s} + {n}")
    if gbs < 1 or ngb < 1:
        raise ValueError(f"need gpu_batch_size and num_gpu_batches >= 1, got {gbs} and {ngb}")
    if not 0 < gpu_mem_util <= 1:
        raise ValueError(f"gpu_mem_util must be in (0, 1], got {gpu_mem_util}")
    if cpu_mem_bytes is not None and not 0 < cpu_mem_bytes <= hw.host.memory_bytes:
        raise ValueError(f"cpu_mem_bytes must be in (0, {hw.name}'s host memory {_gib(hw.host.memory_bytes)}], "
                         f"got {cpu_mem_bytes}")

    B, L, W, k = gbs * ngb, m.num_layers, m.layer_weight_bytes, m.kv_bytes_per_token_layer
    a, c = m.hidden_size * m.dtype_bytes, s + n // 2
    loads_p, stores_p = dict(weights=W, acts=B * s * a), dict(cache=B * s * k, acts=B * s * a)
    loads_g, stores_g = dict(weights=W, cache=B * c * k, acts=B * a), dict(cache=B * k, acts=B * a)
    prefill = _time_rows(ngb * cost_model.layer_time(BatchShape.of(prefills=[(s, 0)] * gbs)),
                         _offloaded(**loads_p), _offloaded(**stores_p), _on_disk(**loads_p), _on_disk(**stores_p),
                         cost_model)
    decode = _time_rows(ngb * cost_model.layer_time(BatchShape.of(decodes=[c] * gbs)),
                        _offloaded(**loads_g), _offloaded(**stores_g), _on_disk(**loads_g), _on_disk(**stores_g),
                        cost_model)
    moved = sum(_offloaded(**x) + _on_disk(**x) for x in (loads_p, stores_p)) \
        + (n - 1) * sum(_offloaded(**x) + _on_disk(**x) for x in (loads_g, stores_g))
    kv, acts = L * B * (s + n) * k, B * s * a
    fixed = m.weight_bytes - L * W + m.activation_bytes(gbs * s, gbs)
    buffers = dict(weights=W, cache=gbs * (s + n) * k)  # one layer's weights, one GPU batch's KV of a layer
    home = dict(weights=L * W, cache=kv, acts=acts)
    tiers = [("HBM", np.array([fixed, L * W, kv, acts, 0, 0, 0], dtype=float) + 2 * _offloaded(**buffers),
              int(hw.gpu.hbm_bytes * gpu_mem_util)),
             ("CPU memory", _offloaded(**home) - _on_disk(**home) + 2 * _on_disk(**buffers),
              cpu_mem_bytes or hw.host.memory_bytes)]
    columns = 4
    if hw.disk is not None:
        tiers.append(("disk", _on_disk(**home), hw.disk.capacity_bytes))
        columns += 3
    head = n * ngb * cost_model.head_time(BatchShape(sampled_tokens=gbs))
    return _Costs(prefill[:, :columns], decode[:, :columns],
                  tuple((name, use[:columns], capacity) for name, use, capacity in tiers), moved[:columns], head)


def _placement(costs: _Costs, cm: CostModel, s: int, n: int, gbs: int, ngb: int,
               shares: np.ndarray) -> FlexGenPlacement:
    """The placement at `shares` (SHARES' values, cut to the system's tiers) and what it predicts."""
    point = np.array([1.0, *shares])
    t_p, t_g = costs.prefill @ point, costs.decode @ point
    total = cm.model.num_layers * (t_p.max() + (n - 1) * t_g.max()) + costs.head
    used = [round(use @ point) for _, use, _ in costs.tiers]
    gpu, cpu, disk = used + [0] * (3 - len(used))  # no disk tier: nothing on disk
    wg, cg, hg, wd, cd, hd = (float(x) for x in [*shares, 0.0, 0.0, 0.0][:6])  # no disk tier: none on disk
    return FlexGenPlacement(gbs, ngb, wg, cg, hg, float(t_p.max()), float(t_g.max()), BOUNDS[int(t_g.argmax())],
                            float(total), gbs * ngb * n / float(total), gpu, cpu, wd, cd, hd, disk_bytes=disk)


def solve(cost_model: CostModel, prompt_len: int, gen_len: int, gpu_batch_size: int, num_gpu_batches: int,
          gpu_mem_util: float = 0.9, cpu_mem_bytes: int | None = None) -> FlexGenPlacement:
    """The fastest placement of one block shape, in CPU memory `cpu_mem_bytes` (None: the host's).
    Raises `CapacityError` (a ValueError) if none fits."""
    s, n, gbs, ngb = prompt_len, gen_len, gpu_batch_size, num_gpu_batches
    costs = _costs(cost_model, s, n, gbs, ngb, gpu_mem_util, cpu_mem_bytes)
    shares = costs.shares

    # Variables (shares, T_p/compute_p, T_g/compute_g): every row is scaled to order one so that the
    # solver's absolute tolerances (1e-7) mean the same for microseconds and for bytes.
    scale_p, scale_g = costs.prefill[0, 0], costs.decode[0, 0]
    A, b = [], []
    for rows, scale, t in ((costs.prefill, scale_p, [-1, 0]), (costs.decode, scale_g, [0, -1])):
        for row in rows[1:]:  # row · (1, shares) <= T, the compute row being T's lower bound
            A.append([*row[1:] / scale, *t])
            b.append(-row[0] / scale)
    for _, use, capacity in costs.tiers:
        A.append([*use[1:] / capacity, 0, 0])
        b.append(1 - use[0] / capacity)
    if shares > 3:  # each kind's share in HBM + its share on disk <= 1
        A += [[*np.eye(3)[kind], *np.eye(3)[kind], 0, 0] for kind in range(3)]
        b += [1] * 3
    time = np.array([0] * shares + [scale_p, (n - 1) * scale_g])
    time /= time.sum()
    bounds = [(0, 1)] * shares + [(1, None)] * 2
    from scipy.optimize import linprog  # here: importing scipy costs every command ~0.5 s at start-up

    fastest = linprog(time, A_ub=A, b_ub=b, bounds=bounds, method="highs")
    if fastest.status == 2:
        raise CapacityError(_why(cost_model, s, n, gbs, ngb, gpu_mem_util, costs))
    if fastest.status != 0:
        raise RuntimeError(f"linprog failed on {cost_model.model.name}/{cost_model.hw.name}: {fastest.message}")
    # Ties are common (compute-bound blocks do not care where data lives): keep the fewest bytes moving.
    moved = costs.moved[1:]
    fewest = linprog([*moved / np.abs(moved).sum(), 0, 0], A_ub=A + [time], b_ub=b + [fastest.fun * (1 + 1e-9)],
                     bounds=bounds, method="highs")
    if fewest.status != 0:
        raise RuntimeError(f"linprog failed on {cost_model.model.name}/{cost_model.hw.name}: {fewest.message}")
    x = np.clip(fewest.x[:shares], 0, 1) + 0.0  # + 0.0 turns -0.0 into 0.0
    x[3:] = np.minimum(x[3:], 1 - x[:shares - 3])  # the solver's tolerance may overfill a kind by 1e-9
    return _placement(costs, cost_model, s, n, gbs, ngb, x)


def evaluate(cost_model: CostModel, prompt_len: int, gen_len: int, gpu_batch_size: int, num_gpu_batches: int,
             wg: float, cg: float, hg: float, wd: float = 0.0, cd: float = 0.0, hd: float = 0.0,
             gpu_mem_util: float = 0.9, cpu_mem_bytes: int | None = None) -> FlexGenPlacement:
    """The cost model's prediction for a placement given by hand (FlexGen's cost model does both: find a
    policy, or estimate a given one). Raises `CapacityError` naming a tier it overfills."""
    costs = _costs(cost_model, prompt_len, gen_len, gpu_batch_size, num_gpu_batches, gpu_mem_util, cpu_mem_bytes)
    shares = np.array([wg, cg, hg, wd, cd, hd], dtype=float)
    if cost_model.hw.disk is None and shares[3:].any():
        raise ValueError(f"{cost_model.hw.name} has no disk: wd, cd and hd must be 0")
    check_shares(shares[:3], shares[3:])
    shares = shares[:costs.shares]
    for tier, use, capacity in costs.tiers:
        if (needed := use @ [1, *shares]) > capacity:
            raise CapacityError(f"the placement needs {_gib(needed)} of {tier}, more than its {_gib(capacity)}")
    return _placement(costs, cost_model, prompt_len, gen_len, gpu_batch_size, num_gpu_batches, shares)


def _why(cm: CostModel, s: int, n: int, gbs: int, ngb: int, util: float, costs: _Costs) -> str:
    """Which memory refuses the block: HBM alone (its floor with everything offloaded), or every tier."""
    m, hw = cm.model, cm.hw
    (_, gpu, usable), (_, _, host) = costs.tiers[:2]
    where = f"{m.name} on {hw.name} cannot hold a block of {ngb} x {gbs} sequences of {s} + {n} tokens"
    hbm = f"{_gib(usable)} usable HBM ({util:g} of {_gib(hw.gpu.hbm_bytes)})"
    floor = gpu[0] + np.minimum(gpu[1:], 0).sum()
    if floor > usable:
        return (f"{where}: HBM is the binding constraint, with everything offloaded it still needs "
                f"{_gib(floor)} (embeddings and LM head, working activations, streaming buffers) > {hbm}")
    kv = m.num_layers * ngb * gbs * (s + n) * m.kv_bytes_per_token_layer
    acts = ngb * gbs * s * m.hidden_size * m.dtype_bytes
    tiers, room = ("GPU + CPU", "") if hw.disk is None else ("GPU + CPU + disk", f" + {_gib(hw.disk.capacity_bytes)} disk")
    return (f"{where}: {tiers} memory is the binding constraint, weights {_gib(m.weight_bytes)} + KV cache "
            f"{_gib(kv)} + activations {_gib(acts)} exceed {hbm}, less its buffers, + {_gib(host)} host "
            f"memory{room}")


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.4g} GiB"


def search(cost_model: CostModel, prompt_len: int, gen_len: int, gpu_mem_util: float = 0.9,
           gpu_batch_sizes: Iterable[int] = DEFAULT_GPU_BATCH_SIZES,
           num_gpu_batches: Iterable[int] = DEFAULT_NUM_GPU_BATCHES,
           cpu_mem_bytes: int | None = None) -> FlexGenPlacement:
    """FlexGen's outer search: the highest-throughput feasible block shape and its placement. Raises
    `CapacityError` (a ValueError) naming the binding memory for the smallest block if none fits."""
    gpu_batch_sizes, num_gpu_batches = sorted(gpu_batch_sizes), sorted(num_gpu_batches)
    if not gpu_batch_sizes or not num_gpu_batches:
        raise ValueError("the search needs at least one gpu batch size and one number of gpu batches")
    best: FlexGenPlacement | None = None
    refusal: CapacityError | None = None
    for gbs in gpu_batch_sizes:
        for ngb in num_gpu_batches:
            try:
                plan = solve(cost_model, prompt_len, gen_len, gbs, ngb, gpu_mem_util, cpu_mem_bytes)
            except CapacityError as e:
                refusal = refusal or e
                break  # more GPU batches only need more memory
            if best is None or plan.throughput > best.throughput:
                best = plan
    if best is None:
        assert refusal is not None  # some block shape was tried, and each refused
        raise refusal
    return best
