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
                                    [--out out/bench_adaptive]

Writes runs.csv (every run's summary) and panels.csv (the table) under --out; prints the table as
Markdown. About 40 minutes on the 2-core CPU VM.
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
    load = "offline" if base.rate == math.inf else f"{base.rate:.2f}/s"
    return dict(hw=base.hw, model=base.model, load=load, gpu_mem_util=base.gpu_mem_util,
                link_bound=shares[-1], best_static=static.best_share, pie_tok_s=static.pie["throughput_tok_s"],
                vs_best_static=static.throughput_vs_best, vs_vllm=static.throughput_vs_vllm,
                latency_vs_best_static=static.latency_vs_best, passed=not static.failures,
                misses="; ".join(static.failures), best_pie_fixed=pinned.best_share,
                vs_best_pie_fixed=pinned.throughput_vs_best, latency_vs_best_pie_fixed=pinned.latency_vs_best)


def run_stage(bases: list[Scenario], step: float, console: Console, workers: int | None, label: str):
    """Every run of `bases`' panels in one pool; returns (rows, every run's summary with its panel)."""
    plans = [plan(base, step) for base in bases]
    scenarios = [s for _, panel in plans for s in panel]
    summaries = iter(run_parallel(summarize, scenarios, console, label, workers))
    rows, runs = [], []
    for base, (shares, panel) in zip(bases, plans):
        got = [next(summaries) for _ in panel]
        rows.append(judge(base, shares, got))
        runs += [dict(panel=f"{base.hw}/{base.model}/{rows[-1]['load']}/{base.gpu_mem_util:g}",
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
    parser.add_argument("--out", default="out/bench_adaptive", help="folder for runs.csv and panels.csv")
    args = parser.parse_args()
    console, started = Console(), time.perf_counter()
    feasible, skipped = [], []
    for base in panels(args.num_requests):
        why = fits(base)
        (skipped.append((base, why)) if why else feasible.append(base))
    offline, runs = run_stage(feasible, args.step, console, args.workers, "offline panels")
    serving = [base.replace(rate=args.knee * next(r for r in runs if r["panel"].startswith(
        f"{base.hw}/{base.model}/offline/{base.gpu_mem_util:g}") and r["run"] == "vllm")["throughput_req_s"])
        for base in feasible]
    loaded, more = run_stage(serving, args.step, console, args.workers, "serving panels")
    rows = [row for pair in zip(offline, loaded) for row in pair]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "runs.csv", runs + more)
    write_rows(out / "panels.csv", rows)
    print(markdown(rows, skipped))
    print(f"\n{sum(r['passed'] for r in rows)} of {len(rows)} panels meet the targets; {len(skipped) * 2} not run; "
          f"{(time.perf_counter() - started) / 60:.0f} min; wrote {out}/runs.csv and {out}/panels.csv")


if __name__ == "__main__":
    main()
