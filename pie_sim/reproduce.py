"""The Pie paper's experiment grid in simulation (arXiv 2411.09317: GH200, OPT-13B and OPT-30B, ShareGPT
and Alpaca), measured the way its claims are stated:

- latency vs load: normalized latency (mean e2e / output tokens) against Poisson request rate for every
  policy, rates scaled per panel by vLLM's offline throughput (the most it serves), each point marked
  sustainable or not (steady_state.py);
- throughput at equal latency: the highest *sustainable* rate whose mean normalized latency over the
  steady-state window meets an SLO, for pie and vllm (`capacity.max_rate`, below each one's offline
  throughput), each SLO being a factor (`slo_factors`) x vLLM's normalized latency at light load
  (`rate_factors[0]`): a tight one before the knee of the curves and, in the full grid, a loose one past it;
- GPU memory at equal performance: the least HBM, up to the paper's 0.9, with which pie, and vllm, sustain
  the rate vLLM sustains with 0.9 of HBM within the tight SLO (`capacity.min_gpu_mem`). Unlike `pie-sim
  capacity`, these searches are not confirmed with longer runs: the paper's metric is a mean, which the rare
  congestion episodes that move a tail percentile move little, and the grid is large;
- FlexGen: offline throughput (every request at once, its best case) and latency, pie against flexgen.

Every point is an ordinary `Scenario`, so any number here can be re-run alone with `pie-sim run`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rich.console import Console

from hwmodels import CostModel, GiB, load_hardware, load_model
from pie_policy.sizing import link_bound_share
from pie_serving.slo import Slo

from .capacity import Job, offline_summary, search
from .parallel import run_parallel
from .scenario import Scenario, summarize_steady, workload_of

MODELS, TRACES = ("opt-13b", "opt-30b"), ("sharegpt", "alpaca")
SEARCHED = ("vllm", "pie")
PAPER_GPU_MEM_UTIL = 0.9


@dataclass(frozen=True)
class Grid:
    """How much of the experiment to run: `QUICK` is for a minute on a laptop, `FULL` for a report."""
    num_requests: int
    rate_factors: tuple[float, ...]   # of vLLM's offline req/s; the first is the light load setting the SLOs
    tolerance: float
    slo_factors: tuple[float, ...] = (1.5, 5.0)   # the first (tight) also sets the GPU-memory question
    static_shares: tuple[float, ...] = (0.1, 0.2, 0.3)

    @property
    def policies(self) -> tuple[tuple[str, float | None], ...]:
        """(policy, share) of every curve."""
        return (("vllm", None), ("vllm-swap", None), *(("static", s) for s in self.static_shares), ("pie", None),
                ("flexgen", None))


# quick: fewer requests (a steady-state window of 180, a few latencies long at the rates searched), rates and
# static shares, and no loose SLO (so few requests never reach its knee)
QUICK = Grid(300, (0.1, 0.5, 1.0, 1.3), tolerance=0.1, slo_factors=(1.5,), static_shares=(0.2,))
FULL = Grid(1000, (0.1, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4, 1.7), tolerance=0.02)


def label(policy: str, share: float | None) -> str:
    return f"{policy}-{share:g}" if share is not None else policy


@dataclass
class Panel:
    """One model x trace: every run made for it."""
    model: str
    trace: str
    base: Scenario
    offline: dict          # label → summary at rate inf
    curves: dict           # label → [summary per rate factor]
    rates: tuple[float, ...] = ()
    slos: tuple[float, ...] = ()        # s/token on the window's mean normalized latency, per grid SLO factor
    max_rates: tuple[dict, ...] = ()    # per SLO: policy → Answer
    min_hbm: dict | None = None         # policy → Answer (at vLLM's max rate, tight SLO)

    @property
    def name(self) -> str:
        return f"{self.model} / {self.trace}"

    @property
    def slo(self) -> float:
        """The tight SLO: the one the GPU-memory question uses."""
        return self.slos[0]


def run(grid: Grid, hw: str, console: Console, workers: int | None = None) -> list[Panel]:
    """Every run of the grid on `hw`, in four parallel stages (each needs the one before)."""
    panels = [Panel(m, t, Scenario(hw=hw, model=m, trace=t, num_requests=grid.num_requests,
                                   gpu_mem_util=PAPER_GPU_MEM_UTIL), {}, {}) for m in MODELS for t in TRACES]
    jobs = [(p, label(*ps), p.base.replace(policy=ps[0], share=ps[1], rate=math.inf))
            for p in panels for ps in grid.policies]
    for (p, name, _), summary in zip(jobs, run_parallel(offline_summary, [j[2] for j in jobs], console,
                                                         "offline runs", workers)):
        p.offline[name] = summary
    jobs = []
    for p in panels:
        p.rates = tuple(f * p.offline["vllm"]["throughput_req_s"] for f in grid.rate_factors)
        jobs += [(p, label(*ps), p.base.replace(policy=ps[0], share=ps[1], rate=r)) for ps in grid.policies for r in p.rates]
    for (p, name, _), summary in zip(jobs, run_parallel(summarize_steady, [j[2] for j in jobs], console,
                                                         "latency vs rate", workers)):
        p.curves.setdefault(name, []).append(summary)
    for p in panels:
        p.slos = tuple(f * p.curves["vllm"][0]["normalized_latency_s"] for f in grid.slo_factors)
    searches = [Job(p.base.replace(policy=name), slos_of(slo), grid.tolerance, offline=p.offline[name]["offline_req_s"],
                    confirm=1) for p in panels for slo in p.slos for name in SEARCHED]
    answers = iter(run_parallel(search, searches, console, "throughput at the SLOs", workers))
    for p in panels:
        p.max_rates = tuple({name: next(answers) for name in SEARCHED} for _ in p.slos)
    searches = [Job(p.base.replace(policy=name, rate=p.max_rates[0]["vllm"].value), slos_of(p.slo), grid.tolerance,
                    min_hbm=True, confirm=1)
                for p in panels for name in SEARCHED if _finite(p.max_rates[0]["vllm"].value)]
    answers = iter(run_parallel(search, searches, console, "GPU memory at the SLO", workers))
    for p in panels:
        if _finite(p.max_rates[0]["vllm"].value):
            p.min_hbm = {name: next(answers) for name in SEARCHED}
    return panels


def slos_of(normalized_s: float) -> tuple[Slo, ...]:
    """The paper's latency target: mean normalized latency (s/token), here over the steady-state window."""
    return (Slo("normalized", None, normalized_s),)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if _finite(a) and _finite(b) and b > 0 else None


@dataclass(frozen=True)
class Findings:
    """The four claimed figures, per panel (None where the grid cannot say)."""
    throughput: tuple[float | None, ...]  # pie's max rate / vllm's, per SLO
    latency: float | None             # vllm's normalized latency / pie's, best rate of the curve
    gpu_memory: float | None          # HBM vllm needs / HBM pie needs, same rate and SLO
    flexgen: float | None             # pie's offline tokens/s / flexgen's


def findings(p: Panel) -> Findings:
    latency = [_ratio(v["normalized_latency_s"], q["normalized_latency_s"])
               for v, q in zip(p.curves["vllm"], p.curves["pie"])]
    memory = p.min_hbm and _ratio(p.min_hbm["vllm"].value, p.min_hbm["pie"].value)
    return Findings(tuple(_ratio(rates["pie"].value, rates["vllm"].value) for rates in p.max_rates),
                    max((r for r in latency if r is not None), default=None), memory,
                    _ratio(p.offline["pie"]["throughput_tok_s"], p.offline["flexgen"]["throughput_tok_s"]))


def facts(p: Panel) -> dict:
    """What explains a panel's figures: how KV-limited vLLM is, and how much the link lets pie pool."""
    cm = CostModel(load_hardware(p.base.hw), load_model(p.model))
    workload = workload_of(p.base)
    context = int((workload.prompt_tokens + workload.output_tokens).mean())
    pool = cm.memory_budget(PAPER_GPU_MEM_UTIL).kv_pool_bytes
    busiest = p.curves["vllm"][-1]
    return dict(mean_context=context, kv_pool_gib=pool / GiB,
                kv_pool_sequences=pool / (context * cm.model.kv_bytes_per_token),
                link_bound_share=link_bound_share(cm, pool, context),
                vllm_preemptions=busiest["preemptions"], vllm_peak_gpu_kv_gib=busiest["peak_gpu_kv_bytes"] / GiB,
                pie_peak_cpu_kv_gib=max(s["peak_cpu_kv_bytes"] for s in p.curves["pie"]) / GiB)
