"""Step overlap: does layer swapping hide its copies, and what does copy traffic cost compute?

Decode iterations of a memory-bound model (random weights; OPT-6.7B in FP16 on a GPU: 32 sequences of
1024 tokens, whose KV read per layer is about the layer's weights) with 0, 5, 10 and 20% of every
sequence's KV blocks in CPU memory, prefetched 1, 2 or 3 layers ahead, under both copy orderings side by
side (copier.py: `stream`, what the executor has always done, and `events`, only the compute the data
depends on); then all KV on the GPU while copies unrelated to the batch run each way at full speed
(background): the compute slowdown per GB/s of copies, the HBM contention the simulator charges. The
sequences' CPU blocks are their first ones, at consecutive CPU slots (as pie places prompts' full
blocks: one copy call per layer, and no write-back: each sequence's growing tail stays on the GPU).

Each configuration runs one warm-up iteration (its first plan prefetches the first layers) and then
`iterations`, in `rounds` that take the configurations in turn, so that a drift moves them all alike;
figures are medians over the measured iterations, timed on the device's clock (iteration: from the
first kernel to the sampled tokens; layers: their compute, stalls left out). The simulator's Timeline
prices the very same plans on the hardware entry (a roofline until calibrated) beside them. Writes
overlap.csv, one row per configuration.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from itertools import count

import torch

from hwmodels import BatchShape, CostModel, load_hardware
from pie_exec.copier import ORDERINGS, STREAM, CudaCopier
from pie_exec.engine import Executor
from pie_exec.model import Transformer
from pie_policy import Copy, EngineConfig, Plan, SeqWork
from pie_policy.blocks import CPU, GPU, BlockRef
from pie_policy.layerswap import FifoLayerSwap, SwapSteps
from pie_policy.plan import D2H, H2D, LAYER_KV
from pie_sim.timeline import Timeline

from .context import OK, Context, Result, table, write_rows
from .sizing import DEPTHS, QUICK_DEPTHS, QUICK_SHARES, SHARES, background_blocks, decode_batch, model_at

BACKGROUND = (("h2d", (H2D,)), ("d2h", (D2H,)), ("both", (H2D, D2H)))
COVER = 2.0  # background copies queued for this many plain iterations' time (some finish while issuing)


def random_on_device(spec, device: torch.device) -> Transformer:
    """The model with N(0, 0.02²) weights drawn on the device at its dtype: timing does not depend on the
    values, and `random_transformer`, which draws on the CPU (the same weights on every device), takes
    minutes for 6.7B parameters."""
    dtype = {2: torch.float16, 4: torch.float32}[spec.dtype_bytes]
    model = Transformer(spec, dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


@dataclass(frozen=True)
class Config:
    label: str
    share: float = 0.0
    depth: int = 1
    ordering: str = STREAM
    background: tuple[str, ...] = ()


def configs(ctx: Context) -> list[Config]:
    """All KV on the GPU first (the others are measured against it), then every share, depth and ordering,
    then the background copies."""
    shares, depths = (QUICK_SHARES, QUICK_DEPTHS) if ctx.quick else (SHARES, DEPTHS)
    out = [Config("all KV on the GPU")]
    out += [Config(f"{share:.0%} on CPU, depth {depth}, {ordering}", share, depth, ordering)
            for share in shares for depth in depths for ordering in ORDERINGS]
    out += [Config(f"background {name}", background=directions) for name, directions in BACKGROUND]
    return out


def repeats(ctx: Context) -> tuple[int, int]:
    """(rounds, measured iterations a configuration a round)."""
    if not ctx.cuda:
        return 2, 3
    return (2, 4) if ctx.quick else (3, 6)


@dataclass
class Measured:
    """A configuration's plans (the warm-up's first) and the stats of the measured ones, and what the
    background copies moved during them: direction → (bytes, busy seconds)."""
    plans: list
    stats: list
    moved: list


class Bench:
    """The model, its executor with room for the largest share and depth, and a second executor whose
    copier carries the background copies."""

    def __init__(self, ctx: Context):
        self.device, self.cuda = torch.device(ctx.device), ctx.cuda
        self.batch = decode_batch(ctx.device)
        self.spec = model_at(ctx.model, ctx.device)
        self.model = random_on_device(self.spec, self.device)
        self.cost = CostModel(load_hardware(ctx.hw), self.spec)
        b, block_layer = self.batch, self.batch.block_size * self.spec.kv_bytes_per_token_layer
        self.block_layer, self.ids, self.iteration = block_layer, count(), count()
        depths = QUICK_DEPTHS if ctx.quick else DEPTHS
        config = EngineConfig(num_layers=self.spec.num_layers, block_bytes_layer=block_layer,
                              num_gpu_blocks=b.batch * b.blocks, num_cpu_blocks=b.batch * b.cpu_blocks(max(SHARES)),
                              block_size=b.block_size, max_model_len=self.spec.max_context,
                              max_num_batched_tokens=max(2048, self.spec.max_context))
        self.config = config
        self.executor = Executor(self.model, config, self.device, max(depths) + 1)
        self.half = background_blocks(self.spec, b, ctx.device) // 2
        self.background = Executor(self.model, EngineConfig(1, block_layer, 1, 2 * self.half, b.block_size,
                                                            max_model_len=config.max_model_len,
                                                            max_num_batched_tokens=config.max_num_batched_tokens),
                                   self.device, 1)
        self.shape = BatchShape.of(decodes=[b.context - 1] * b.batch)
        self.copy_s = {direction: self._background_copy_seconds(direction) for direction in (H2D, D2H)}

    def close(self) -> None:
        self.executor.close()
        self.background.close()

    def seqs(self, share: float) -> tuple[SeqWork, ...]:
        """The batch with its first `cpu_blocks(share)` blocks a sequence in CPU memory."""
        b = self.batch
        n, k = b.blocks, b.cpu_blocks(share)
        return tuple(SeqWork(i, 1, b.context - 1, True, tuple([BlockRef(CPU, i * k + j) for j in range(k)]
                                                               + [BlockRef(GPU, i * (n - k) + j) for j in range(n - k)]))
                     for i in range(b.batch))

    def _background_copies(self, direction: str, copies: int) -> list[Copy]:
        first = 0 if direction == H2D else self.half
        pairs = tuple((first + j, first + j) for j in range(self.half))
        return [Copy(next(self.ids), direction, LAYER_KV, 0, pairs, self.half * self.block_layer, 1, (), 0)
                for _ in range(copies)]

    def _finish(self, executor: Executor, copies: list[Copy]) -> None:
        executor.copier.wait([c.op_id for c in copies])
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _background_copy_seconds(self, direction: str) -> float:
        """Wall seconds of one background copy alone (the median of 5, after one)."""
        seconds = []
        for _ in range(6):
            copies = self._background_copies(direction, 1)
            start = time.perf_counter()
            self.background._issue(copies)
            self._finish(self.background, copies)
            seconds.append(time.perf_counter() - start)
        self.background.copier.take_busy()
        return statistics.median(seconds[1:])

    def measure(self, config: Config, iterations: int, plain_s: float) -> Measured:
        """A warm-up iteration then `iterations`; background copies for `COVER` times `plain_s` each."""
        seqs = self.seqs(config.share)
        swapper = FifoLayerSwap(self.spec.num_layers, config.depth, self.config.num_cpu_blocks, self.block_layer,
                                self.batch.block_size, True, self.ids) if config.share else None
        if isinstance(self.executor.copier, CudaCopier):
            self.executor.copier.ordering = config.ordering  # one copy thread on the CPU: no ordering to set
        tokens = [[0]] * self.batch.batch
        out = Measured([], [], [])
        for i in range(iterations + 1):
            swap = swapper.plan_seqs(seqs) if swapper else None  # every sequence decodes: each writes its tail
            plan = (Plan(next(self.iteration), seqs, self.shape, swap.prologue_copies(), SwapSteps(swap),
                         swap.staging_slots()) if swap else Plan(next(self.iteration), seqs, self.shape))
            background = [c for d in config.background
                          for c in self._background_copies(d, math.ceil(COVER * plain_s / self.copy_s[d]))]
            self.background._issue(background)
            stats, _, _ = self.executor.execute(plan, tokens, 0.0)
            self._finish(self.background, background)
            busy = self.background.copier.take_busy()
            out.plans.append(plan)
            if i:
                out.stats.append(stats)
                out.moved.append({d: (sum(c.nbytes for c in background if c.direction == d), busy[d])
                                  for d in config.background})
        self._finish(self.executor, list(plan.copies()))  # the last plan's prefetches for a next one
        self.executor.copier.take_busy()
        return out

    def predicted(self, measured: Measured) -> list:
        """The simulator's stats for the measured plans, each started when the one before ends."""
        timeline, end, out = Timeline(self.cost), 0.0, []
        for plan in measured.plans:
            out.append(timeline.run(plan, end))
            end = out[-1].end_s
        return out[1:]


def median(values) -> float:
    return statistics.median(values)


def row(bench: Bench, config: Config, m: Measured, plain: dict | None) -> dict:
    """overlap.csv's row of a configuration (times in ms, rates in GB/s)."""
    s, p = m.stats, bench.predicted(m)
    layers = median(sum(x.layer_compute_s) for x in s) * 1e3
    predicted_layers = median(sum(x.layer_compute_s) for x in p) * 1e3
    out = {"config": config.label, "share": config.share,
           "cpu_block_share": bench.batch.cpu_blocks(config.share) / bench.batch.blocks, "depth": config.depth,
           "ordering": config.ordering if config.share else "", "background": "+".join(config.background),
           "iterations": len(s), "iteration_ms": median(x.compute_s + x.stall_s for x in s) * 1e3,
           "wall_ms": median(x.end_s - x.start_s for x in s) * 1e3, "stall_ms": median(x.stall_s for x in s) * 1e3,
           "layers_ms": layers, "slowdown": layers / plain["layers_ms"] - 1 if plain else 0.0,
           "h2d_mb": median(x.bytes_h2d for x in s) / 1e6,
           "h2d_busy_gb_s": _rate(sum(x.bytes_h2d for x in s), sum(x.h2d_busy_s for x in s)),
           "predicted_iteration_ms": median(x.end_s - x.start_s for x in p) * 1e3,
           "predicted_stall_ms": median(x.stall_s for x in p) * 1e3, "predicted_layers_ms": predicted_layers,
           "predicted_slowdown": predicted_layers / plain["predicted_layers_ms"] - 1 if plain else 0.0}
    rate = sum(_rate(sum(moved[d][0] for moved in m.moved), sum(moved[d][1] for moved in m.moved))
               for d in config.background)
    out["background_gb_s"] = rate
    if config.background:  # the cost model's charge at the rate measured
        out["predicted_slowdown"] = charged_slowdown(bench.cost, bench.shape, rate * 1e9)
    return out


def charged_slowdown(cost: CostModel, shape: BatchShape, copy_bandwidth: float) -> float:
    """How much slower the cost model makes a layer with `copy_bandwidth` bytes/s of copies in flight; inf
    where it leaves compute no HBM bandwidth (it refuses to price that)."""
    try:
        return cost.layer_time(shape, copy_bandwidth=copy_bandwidth) / cost.layer_time(shape) - 1
    except ValueError:
        return math.inf


def _rate(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


def step(ctx: Context) -> Result:
    bench = Bench(ctx)
    rounds, iterations = repeats(ctx)
    todo = configs(ctx)
    measured: dict[Config, Measured] = {}
    try:
        for _ in range(rounds):
            for config in todo:
                plain = measured.get(todo[0])
                plain_s = median(x.end_s - x.start_s for x in plain.stats) if plain else 0.0
                m = bench.measure(config, iterations, plain_s)
                if config in measured:  # the first round's plans are the ones priced; they repeat
                    measured[config].stats += m.stats
                    measured[config].moved += m.moved
                else:
                    measured[config] = m
        first = row(bench, todo[0], measured[todo[0]], None)
        rows = [first] + [row(bench, c, measured[c], first) for c in todo[1:]]
    finally:
        bench.close()
    return Result(OK, f"{len(rows)} configurations", report(bench, rows), [write_rows(ctx.folder / "overlap.csv", rows)])


def report(bench: Bench, rows: list[dict]) -> list[str]:
    b, spec = bench.batch, bench.spec
    per_layer = b.batch * b.context * spec.kv_bytes_per_token_layer
    lines = [f"{spec.name} ({spec.dtype_bytes}-byte values), {b.batch} sequences of {b.context} tokens: "
             f"{per_layer / 1e6:.3g} MB of KV and {spec.layer_weight_bytes / 1e6:.3g} MB of weights a layer. "
             "Medians; predicted: the simulator's Timeline on the same plans (hardware entry's roofline).", ""]
    swapped = [r for r in rows if not r["background"]]
    lines += table(["configuration", "CPU blocks", "iteration ms", "stall ms", "layers ms", "slowdown",
                    "h2d GB/s busy", "predicted iteration ms", "predicted stall ms"],
                   [[r["config"], f"{r['cpu_block_share']:.0%}", f"{r['iteration_ms']:.2f}", f"{r['stall_ms']:.2f}",
                     f"{r['layers_ms']:.2f}", f"{r['slowdown']:+.1%}", f"{r['h2d_busy_gb_s']:.1f}",
                     f"{r['predicted_iteration_ms']:.2f}", f"{r['predicted_stall_ms']:.2f}"]
                    for r in swapped if r["ordering"] in ("", STREAM)])
    lines += ["", "The two copy orderings side by side (events / stream of the iteration time):", ""]
    pairs = [(r, next(e for e in swapped if e["ordering"] != STREAM and (e["share"], e["depth"]) == (r["share"], r["depth"])))
             for r in swapped if r["ordering"] == STREAM]
    lines += table(["CPU share", "depth", "stream ms", "events ms", "events / stream", "stream stall ms",
                    "events stall ms"],
                   [[f"{s['share']:.0%}", s["depth"], f"{s['iteration_ms']:.2f}", f"{e['iteration_ms']:.2f}",
                     f"{e['iteration_ms'] / s['iteration_ms']:.3f}", f"{s['stall_ms']:.2f}", f"{e['stall_ms']:.2f}"]
                    for s, e in pairs])
    ratios = [e["iteration_ms"] / s["iteration_ms"] for s, e in pairs]
    lines += ["", f"Median events / stream: {median(ratios):.3f} over {len(ratios)} pairs (in a whole-model plan both "
              "wait for the same compute: 1.00 within noise is expected; bench/gpu_check/README.md)"
              + (". On the CPU the two are one copy thread: their difference is the machine's noise." if not bench.cuda
                 else ".")]
    lines += ["", "Compute under copy traffic (all KV on the GPU, copies unrelated to the batch at full speed):", ""]
    lines += table(["background", "copies GB/s", "layers slower", "per 100 GB/s", "simulator charges"],
                   [[r["background"], f"{r['background_gb_s']:.1f}", f"{r['slowdown']:+.1%}",
                     f"{100 * r['slowdown'] / r['background_gb_s']:+.1%}" if r["background_gb_s"] else "-",
                     f"{r['predicted_slowdown']:+.1%}" if math.isfinite(r["predicted_slowdown"]) else "no HBM left"]
                    for r in rows if r["background"]])
    return lines
