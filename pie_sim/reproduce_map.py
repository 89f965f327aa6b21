"""Where the Pie paper's claims hold in simulation: a map over GPU memory (gpu_mem_util), load and model.

For every model x trace of `pie-sim reproduce` and every `MapGrid.utils` at which the model fits, vllm and
pie run offline and at Poisson rates `MapGrid.factors` x vLLM's offline req/s with the paper's 0.9 of HBM
(one absolute scale of load per model x trace, so that memory can be traded for rate). Per claim:

- latency at equal rate: vLLM's normalized latency / pie's, at each (util, rate);
- throughput at equal latency: the highest rate of each curve (linear between its points) within the
  SLO (`slo_factor` x vLLM's normalized latency at the lightest rate with 0.9 of HBM), pie's / vLLM's;
- GPU memory at equal performance: at each rate, the least util of the map at which vLLM meets that SLO
  against the least at which pie does (coarse: the map's utils are its only steps).

A claim holds at a point where pie's figure beats vLLM's by more than `MARGIN`. The report section lists
where, the largest factor, and why elsewhere: whether vLLM ran out of KV cache there (it preempted) and
how much of the KV the link lets pie keep in CPU memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from rich.console import Console

from hwmodels import CapacityError

from .parallel import run_parallel
from .scenario import Scenario, policy_of, summarize

MARGIN = 0.02
POLICIES = ("vllm", "pie")


@dataclass(frozen=True)
class MapGrid:
    utils: tuple[float, ...]
    factors: tuple[float, ...]   # of vLLM's offline req/s with 0.9 of HBM; offline runs too
    slo_factor: float = 1.5


MAP_FULL = MapGrid((0.5, 0.7, 0.9), (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5))
MAP_QUICK = MapGrid((0.5, 0.9), (0.5, 1.0))


@dataclass
class MapPanel:
    """One model x trace over the map: summaries by (util, rate factor or inf for offline, policy)."""
    model: str
    trace: str
    reference_rate: float                       # vLLM's offline req/s with 0.9 of HBM
    runs: dict = field(default_factory=dict)
    unfit: dict = field(default_factory=dict)   # util → why the model does not fit
    link_bound: dict = field(default_factory=dict)  # util → pie's largest share

    @property
    def name(self) -> str:
        return f"{self.model} / {self.trace}"

    def utils(self) -> list[float]:
        return sorted({u for u, _, _ in self.runs})

    def latency(self, util: float, factor: float, policy: str) -> float:
        value = self.runs[util, factor, policy]["normalized_latency_s"]
        return math.inf if value is None else value


def run_map(bases: list[Scenario], reference_rates: list[float], grid: MapGrid, console: Console,
            workers: int | None = None) -> list[MapPanel]:
    """Every map run for the model x trace of each base scenario (its other options kept), in parallel."""
    panels, jobs = [], []
    for base, rate in zip(bases, reference_rates):
        panel = MapPanel(base.model, base.trace, rate)
        for util in grid.utils:
            at = base.replace(gpu_mem_util=util, policy="pie", share=None)
            try:
                panel.link_bound[util] = policy_of(at)[0].controller.max_share
            except CapacityError as e:
                panel.unfit[util] = str(e)
                continue
            for factor in (*grid.factors, math.inf):
                for policy in POLICIES:
                    jobs.append((panel, (util, factor, policy), at.replace(policy=policy, rate=factor * rate)))
        panels.append(panel)
    for (panel, key, _), summary in zip(jobs, run_parallel(summarize, [j[2] for j in jobs], console, "map runs",
                                                           workers)):
        panel.runs[key] = summary
    return panels


def slo_of(panel: MapPanel, grid: MapGrid) -> float:
    """The SLO: slo_factor x vLLM's normalized latency at the lightest rate with 0.9 of HBM (or the
    largest util of the map)."""
    return grid.slo_factor * panel.latency(max(panel.utils()), min(grid.factors), "vllm")


def max_rate(panel: MapPanel, grid: MapGrid, util: float, policy: str, slo: float) -> tuple[float | None, bool]:
    """(the highest rate within `slo` on the curve, linear between its points; None if none is), and whether
    it is the curve's last point (the rate may be higher)."""
    points = [(f * panel.reference_rate, panel.latency(util, f, policy)) for f in sorted(grid.factors)]
    best = None
    for (r0, l0), (r1, l1) in zip([(0.0, 0.0)] + points, points):
        if l1 <= slo:
            best = r1
        elif l0 <= slo:
            return (r0 + (r1 - r0) * (slo - l0) / (l1 - l0)) if r0 > 0 else None, False
        else:
            break
    return best, best is not None and best == points[-1][0]


@dataclass(frozen=True)
class Point:
    """One point of the map for one claim: where, pie's factor over vLLM (None: cannot say), a note."""
    util: float | None          # None for a figure across utils (GPU memory)
    factor: float | None        # the load, x the reference rate (None for a figure across loads)
    ratio: float | None
    note: str = ""

    @property
    def holds(self) -> bool:
        return self.ratio is not None and self.ratio > 1 + MARGIN


def claims(panel: MapPanel, grid: MapGrid) -> dict[str, list[Point]]:
    """The map's points of each claim for one panel."""
    slo, utils = slo_of(panel, grid), panel.utils()
    latency = [Point(u, f, panel.latency(u, f, "vllm") / panel.latency(u, f, "pie"), _preempted(panel, u, f))
               for u in utils for f in grid.factors]
    throughput = []
    for u in utils:
        (vllm, vllm_open), (pie, pie_open) = (max_rate(panel, grid, u, p, slo) for p in POLICIES)
        ratio = pie / vllm if pie and vllm else None
        throughput.append(Point(u, None, ratio, "at least (meets the SLO at the highest rate)" if pie_open or
                                vllm_open else ""))
    memory = []
    for f in grid.factors:
        least = {p: min((u for u in utils if panel.latency(u, f, p) <= slo), default=None) for p in POLICIES}
        ratio = least["vllm"] / least["pie"] if least["vllm"] and least["pie"] else None
        memory.append(Point(None, f, ratio, f"least util: vLLM {least['vllm']}, pie {least['pie']}"))
    offline = [Point(u, math.inf, panel.runs[u, math.inf, "pie"]["throughput_tok_s"] /
                     panel.runs[u, math.inf, "vllm"]["throughput_tok_s"], _preempted(panel, u, math.inf))
               for u in utils]
    return {"Normalized latency at equal rate, vLLM / pie": latency,
            f"Throughput at equal latency (SLO {grid.slo_factor:g}x), pie / vLLM": throughput,
            "GPU memory at equal performance, vLLM / pie": memory,
            "Offline throughput, pie / vLLM": offline}


def _preempted(panel: MapPanel, util: float, factor: float) -> str:
    count = panel.runs[util, factor, "vllm"]["preemptions"]
    return f"vLLM preempted {count}" if count else "vLLM never preempted"


def _where(p: Point) -> str:
    where = [] if p.util is None else [f"util {p.util:g}"]
    if p.factor is not None:
        where.append("offline" if math.isinf(p.factor) else f"{p.factor:g}x load")
    return " ".join(where)


def map_section(panels: list[MapPanel], grid: MapGrid) -> list[str]:
    """The report's map: per claim, where it holds (pie better by more than MARGIN), the largest factor and
    why elsewhere; then every point of the map."""
    lines = ["## Where the claims hold: a map over GPU memory, load and model", "",
             (f"vLLM and pie at gpu_mem_util {', '.join(f'{u:g}' for u in grid.utils)}, offline and at "
              f"{', '.join(f'{f:g}' for f in grid.factors)} x vLLM's offline req/s with 0.9 of HBM; SLO "
              f"{grid.slo_factor:g} x vLLM's normalized latency at the lightest rate with 0.9 of HBM. A claim "
              f"holds where pie beats vLLM by more than {MARGIN:.0%} (`pie_sim/reproduce_map.py`; runs in "
              f"`map.csv`)."), ""]
    per_panel = [(p, claims(p, grid)) for p in panels]
    for claim in per_panel[0][1] if per_panel else ():
        points = [(p, q) for p, found in per_panel for q in found[claim]]
        held = [(p, q) for p, q in points if q.holds]
        rated = [(p, q) for p, q in points if q.ratio is not None]
        best = max(rated, key=lambda pq: pq[1].ratio, default=None)
        lines.append(f"**{claim}.** " + (
            f"Holds at {len(held)} of {len(points)} points: " + "; ".join(f"{p.name} {_where(q)} ({q.ratio:.2f}x)"
                                                                        for p, q in held) + "."
            if held else f"Holds nowhere on the map ({len(points)} points)."))
        if best:
            p, q = best
            lines.append(f"Largest factor: {q.ratio:.2f}x, {p.name} {_where(q)}" + (f" ({q.note})" if q.note else "") + ".")
        lines.append("")
    lines += [("Why, per model x trace and util: where vLLM never preempts, its KV pool is not what limits it "
               "and pie, which only pools CPU memory when the GPU is full, is vLLM; where it does, pie's gain is "
               "bounded by the share of the KV the link lets it stream (its largest share below) and by the "
               "HBM traffic each streamed byte adds."), "",
              ("| panel | util | pie's largest share | offline tok/s pie / vLLM | latency vLLM / pie by load | "
               "vLLM preemptions by load |"), "|---|---:|---:|---:|---|---|"]
    for p, _ in per_panel:
        for u in grid.utils:
            if u in p.unfit:
                lines.append(f"| {p.name} | {u:g} | - | does not fit: {p.unfit[u]} | - | - |")
                continue
            offline = p.runs[u, math.inf, "pie"]["throughput_tok_s"] / p.runs[u, math.inf, "vllm"]["throughput_tok_s"]
            ratios = " ".join(f"{f:g}: {p.latency(u, f, 'vllm') / p.latency(u, f, 'pie'):.2f}" for f in grid.factors)
            preempted = " ".join(f"{f:g}: {p.runs[u, f, 'vllm']['preemptions']}" for f in grid.factors)
            lines.append(f"| {p.name} | {u:g} | {p.link_bound[u]:.2f} | {offline:.3f} | {ratios} | {preempted} |")
    return lines


def map_rows(panels: list[MapPanel]) -> list[dict]:
    """Every map run's summary led by its panel, util, load factor and policy (map.csv)."""
    return [dict(model=p.model, trace=p.trace, gpu_mem_util=u, load_factor=f, policy=policy) |
            {k: v for k, v in s.items() if k != "policy"} for p in panels for (u, f, policy), s in p.runs.items()]
