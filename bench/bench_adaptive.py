"""Adaptive expansion against the best fixed CPU share, on a grid of panels: does pie find the share?

Panels: gh200-96g and h100-sxm-pcie5; OPT-13B and OPT-30B; ShareGPT; offline (every request at once) and a
serving load at the knee (Poisson at `--knee` x vLLM's offline request throughput on the same panel: the
capacity, where latency turns up);
gpu_mem_util 0.5 and 0.9. On each, the oracle (pie_sim/oracle.py) runs static at every share from 0 to
pie's largest (the link's bound) in steps of `--step`, pie-fixed (Pie's placement at a held share) at the
same shares, pie and vllm, on the same requests. A panel whose model leaves no KV pool is reported so.

Per panel it prints pie's throughput against the best static share's and vLLM's, its normalized latency
against the best static share's, and pass/fail against the targets (oracle.Verdict: >= 99% of the best
static share's throughput and >= vLLM's, <= 102% of its normalized latency; where no static share's
throughput beats vLLM's, within 0.5% of vLLM); beside them, pie against the best pie-fixed share (the same placement, the share
held: what the controller itself could have found). All runs go through one pool of processes.

    python3 -m bench.bench_adaptive [--num-requests 600] [--knee 1.0] [--step 0.025] [--workers N]
                                    [--only HW/MODEL/LOAD/UTIL,...] [--out out/bench_adaptive]

Writes runs.csv (every run's summary) and panels.csv (the table) under --out; prints the table as
Markdown. About 4 minutes on the 2-core CPU VM with 2 workers. `--only` runs the panels it names (LOAD
offline or knee, any field `*`), e.g. `--only gh200-96g/opt-13b/offline/0.5,h100-sxm-pcie5/*/knee/0.9`; a
knee panel without its offline panel still runs the offline vLLM run that sets its rate.
"""
from __future__ import annotations

import argparse
import math
import time
from itertools import product
from pathlib import Path

from rich.console import Console

from hwmodels import CapacityError
from pie_sim.capacity_report import write_rows
from pie_sim.oracle import label as run_label
from pie_sim.oracle import link_bound, runs_of, share_range, verdict
from pie_sim.parallel import run_parallel
from pie_sim.scenario import Scenario, policy_of, summarize

HW, MODELS, UTILS = ("gh200-96g", "h100-sxm-pcie5"), ("opt-13b", "opt-30b"), (0.5, 0.9)
FIXED = ("static", "pie-fixed")


def panels(num_requests: int) -> list[Scenario]:
    """Every offline panel's base scenario (pie), feasible or not."""
    return [Scenario(hw=hw, model=model, trace="sharegpt", num_requests=num_requests, rate=math.inf,
                     gpu_mem_util=util) for hw, model, util in product(HW, MODELS, UTILS)]


def selected(base: Scenario, load: str, only: list[tuple[str, ...]]) -> bool:
    """Whether `--only`'s selectors (hw, model, load, util; `*` any) name the panel (all do when none)."""
    fields = (base.hw, base.model, load, f"{base.gpu_mem_util:g}")
    return not only or any(all(want in ("*", got) for want, got in zip(selector, fields)) for selector in only)


def selectors(text: str) -> list[tuple[str, ...]]:
    """`--only`'s comma-separated HW/MODEL/LOAD/UTIL selectors, each field checked against the grid."""
    grid = (HW, MODELS, ("offline", "knee"), tuple(f"{u:g}" for u in UTILS))
    out: list[tuple[str, ...]] = []
    for item in filter(None, text.split(",")):
        selector = tuple(item.strip().split("/"))
        if len(selector) != 4 or any(f not in ("*",) + choices for f, choices in zip(selector, grid)):
            raise ValueError(f"--only: '{item}' is not HW/MODEL/LOAD/UTIL with HW in {', '.join(HW)}, MODEL in "
                             f"{', '.join(MODELS)}, LOAD offline or knee, UTIL in {', '.join(grid[3])} (or *)")
        out.append(selector)
    return out


def fits(base: Scenario) -> str:
    """"" when the model leaves a KV pool on the panel, else why not."""
    try:
        policy_of(base)
    except CapacityError as e:
        return str(e)
    return ""


def plan(base: Scenario, step: float) -> tuple[list[float], list[Scenario]]:
    """(the shares, the scenarios: each fixed policy at each share, then pie and vllm) of one panel."""
    shares = share_range(0.0, link_bound(base), step)
    scenarios = [s for fixed in FIXED for s in runs_of(base, fixed, shares)[:len(shares)]]
    return shares, scenarios + runs_of(base, FIXED[0], [])


def judge(base: Scenario, shares: list[float], summaries: list[dict]) -> dict:
    """One panel's row: the best share of each fixed policy and pie against them (oracle.verdict)."""
    n = len(shares)
    tail = summaries[2 * n:]
    static, pinned = verdict(shares, summaries[:n] + tail), verdict(shares, summaries[n:2 * n] + tail)
    return dict(hw=base.hw, model=base.model, load=load_of(base), gpu_mem_util=base.gpu_mem_util,
                link_bound=shares[-1], best_static=static.best_share, pie_tok_s=static.pie["throughput_tok_s"],
                vs_best_static=static.throughput_vs_best, vs_vllm=static.throughput_vs_vllm,
                latency_vs_best_static=static.latency_vs_best, passed=not static.failures,
                misses="; ".join(static.failures), best_pie_fixed=pinned.best_share,
                vs_best_pie_fixed=pinned.throughput_vs_best, latency_vs_best_pie_fixed=pinned.latency_vs_best)


def load_of(base: Scenario) -> str:
    """The panel's load as the table shows it: offline, or the serving rate."""
    return "offline" if base.rate == math.inf else f"{base.rate:.2f}/s"


def panel_name(base: Scenario) -> str:
    """HW/MODEL/LOAD/UTIL, the load offline or the serving rate: runs.csv's panel column."""
    return f"{base.hw}/{base.model}/{load_of(base)}/{base.gpu_mem_util:g}"


def run_stage(bases: list[Scenario], step: float, console: Console, workers: int | None, label: str):
    """Every run of `bases`' panels in one pool; returns (rows, every run's summary with its panel)."""
    plans = [plan(base, step) for base in bases]
    scenarios = [s for _, panel in plans for s in panel]
    summaries = iter(run_parallel(summarize, scenarios, console, label, workers))
    rows, runs = [], []
    for base, (shares, panel) in zip(bases, plans):
        got = [next(summaries) for _ in panel]
        rows.append(judge(base, shares, got))
        runs += [dict(panel=panel_name(base),
                      run=run_label(s.policy, s.share), **summary) for s, summary in zip(panel, got)]
    return rows, runs


def markdown(rows: list[dict], skipped: list[tuple[Scenario, str]]) -> str:
    lines = [("| hw | model | load | gpu_mem_util | link bound | best static share | pie tok/s | vs best static | "
              "vs vLLM | norm. latency vs best static | targets | best pie-fixed share | vs it: tok/s, latency |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        verdict_text = "pass" if r["passed"] else f"**fail**: {r['misses']}"
        lines.append(f"| {r['hw']} | {r['model']} | {r['load']} | {r['gpu_mem_util']:g} | {r['link_bound']:.3f} | "
                     f"{r['best_static']:.3f} | {r['pie_tok_s']:,.0f} | {r['vs_best_static']:.3f} | "
                     f"{r['vs_vllm']:.3f} | {r['latency_vs_best_static']:.3f} | {verdict_text} | "
                     f"{r['best_pie_fixed']:.3f} | {r['vs_best_pie_fixed']:.3f}, "
                     f"{r['latency_vs_best_pie_fixed']:.3f} |")
    for base, why in skipped:
        lines.append(f"| {base.hw} | {base.model} | both | {base.gpu_mem_util:g} | - | - | - | - | - | - | "
                     f"not run: {why} | - | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=600, help="requests a run (default 600)")
    parser.add_argument("--knee", type=float, default=1.0,
                        help="the serving load, x vLLM's offline req/s on the panel (default 1.0)")
    parser.add_argument("--step", type=float, default=0.025, help="share step of the sweep (default 0.025)")
    parser.add_argument("--workers", type=int, help="parallel runs (default: one per CPU core)")
    parser.add_argument("--only", default="", help="comma-separated HW/MODEL/LOAD/UTIL panels to run (LOAD "
                        "offline or knee; any field *) (default: every panel)")
    parser.add_argument("--out", default="out/bench_adaptive", help="folder for runs.csv and panels.csv")
    args = parser.parse_args()
    try:
        only = selectors(args.only)
    except ValueError as e:
        parser.error(str(e))
    console, started = Console(), time.perf_counter()
    feasible, skipped = [], []
    for base in panels(args.num_requests):
        if selected(base, "offline", only) or selected(base, "knee", only):
            why = fits(base)
            (skipped.append((base, why)) if why else feasible.append(base))
    offline, runs = run_stage([b for b in feasible if selected(b, "offline", only)], args.step, console,
                              args.workers, "offline panels")
    knee = [b for b in feasible if selected(b, "knee", only)]
    vllm_offline = {r["panel"]: r for r in runs if r["run"] == "vllm"}  # each knee's rate is x its offline vLLM's
    alone = [b.replace(policy="vllm") for b in knee if panel_name(b) not in vllm_offline]
    vllm_offline |= {panel_name(b): summary for b, summary in zip(
        alone, run_parallel(summarize, alone, console, "knee rates", args.workers))}
    serving = [b.replace(rate=args.knee * vllm_offline[panel_name(b)]["throughput_req_s"]) for b in knee]
    loaded, more = run_stage(serving, args.step, console, args.workers, "serving panels")
    order = {(b.hw, b.model, b.gpu_mem_util): i for i, b in enumerate(feasible)}
    rows = sorted(offline + loaded, key=lambda r: (order[r["hw"], r["model"], r["gpu_mem_util"]], r["load"] != "offline"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "runs.csv", runs + more)
    write_rows(out / "panels.csv", rows)
    print(markdown(rows, skipped))
    unfit = sum(selected(base, load, only) for base, _ in skipped for load in ("offline", "knee"))
    print(f"\n{sum(r['passed'] for r in rows)} of {len(rows)} panels meet the targets; {unfit} not run; "
          f"{(time.perf_counter() - started) / 60:.0f} min; wrote {out}/runs.csv and {out}/panels.csv")


if __name__ == "__main__":
    main()
