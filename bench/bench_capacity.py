"""Whether `pie-sim capacity`'s answers hold: each answer re-run below and above it with more requests.

For every system x policy of a capacity run, its answer R is simulated at `--below` x R (0.95) and at
`--above` x R (1.1) with `--more` x the requests (4), and judged over the steady-state window against the
same SLOs (pie_sim/steady_state.py). An answer holds when below it the system meets the SLOs and serves at
least `--served` (95%) of what is offered (completions / arrivals within the window), and above it does not
(misses an SLO or is not sustainable): a planner can deploy at the answer, and not much beyond it.

    python3 -m bench.bench_capacity [--out out/capacity] [--reuse] [capacity's own options]

runs `pie-sim capacity` with the options given (its defaults otherwise) unless `--reuse` finds its
capacity.csv in --out, then writes check.csv there and prints the table.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pie_sim.capacity import judge_scenario
from pie_sim.capacity_report import write_rows
from pie_sim.cli import build_parser, capacity_options, scenario_of
from pie_sim.cli import main as pie_sim
from pie_sim.parallel import run_parallel
from pie_sim.scenario import Scenario


def checks(rows: list[dict], base: Scenario, more: int, factors: tuple[float, ...]) -> list[tuple[dict, float, Scenario]]:
    """(capacity row, factor, scenario) of every re-run: each answer at each factor, `more` x the requests."""
    return [(row, f, base.replace(hw=row["hw"], policy=row["policy"], rate=f * float(row["max_rate_req_s"]),
                                  num_requests=more * base.num_requests))
            for row in rows if row["max_rate_req_s"] for f in factors]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.bench_capacity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/capacity", help="capacity's folder (default out/capacity)")
    parser.add_argument("--reuse", action="store_true", help="check the capacity.csv already in --out")
    parser.add_argument("--below", type=float, default=0.95, help="factor of the answer that must hold (0.95)")
    parser.add_argument("--above", type=float, default=1.1, help="factor of the answer that must not (1.1)")
    parser.add_argument("--more", type=int, default=4, help="times the requests of the capacity run (4)")
    parser.add_argument("--served", type=float, default=0.95, help="share of the offered rate that must be "
                                                                   "served below the answer (0.95)")
    parser.add_argument("--workers", type=int, help="parallel runs (default: one per CPU core)")
    args, capacity_args = parser.parse_known_args(argv)
    capacity = build_parser().parse_args(["capacity", *capacity_args])
    console = Console(width=160)
    out = Path(args.out)
    started = time.perf_counter()
    if not (args.reuse and (out / "capacity.csv").exists()):
        if pie_sim(["capacity", *capacity_args, "--out", str(out)]) != 0:
            return 2
    searched = time.perf_counter() - started
    with open(out / "capacity.csv") as f:
        rows = list(csv.DictReader(f))
    slos = capacity_options(capacity)
    base = scenario_of(capacity, capacity.policy[0])  # each re-run takes its row's system and policy
    jobs = checks(rows, base, args.more, (args.below, args.above))
    started = time.perf_counter()
    judged = run_parallel(partial(judge_scenario, slos=slos), [s for _, _, s in jobs], console, "re-runs",
                          args.workers)
    checked = time.perf_counter() - started
    results = []
    for (row, factor, scenario), j in zip(jobs, judged):
        results.append(dict(hw=row["hw"], policy=row["policy"], answer_req_s=float(row["max_rate_req_s"]),
                            factor=factor, rate_req_s=scenario.rate, num_requests=scenario.num_requests,
                            served=j.served, **{f"{s.name}_s": j.values[s.name] for s in slos},
                            goodput_req_s=j.goodput_req_s, meets=j.meets, misses="; ".join(j.misses())))
    write_rows(out / "check.csv", results)
    view = Table(title=f"capacity answers re-run at {args.below:g}x and {args.above:g}x with {args.more}x the "
                       f"requests ({base.num_requests * args.more}), SLOs {', '.join(map(str, slos))}")
    for header in ("hardware", "policy", "answer req/s", f"{args.below:g}x: served", "meets", f"{args.above:g}x: served",
                   "meets", "holds", f"what fails at {args.above:g}x"):
        view.add_column(header)
    holding = 0
    for below, above in zip(results[::2], results[1::2]):
        holds = below["meets"] and below["served"] >= args.served and not above["meets"]
        holding += holds
        view.add_row(below["hw"], below["policy"], f"{below['answer_req_s']:.2f}", f"{below['served']:.3f}",
                     str(below["meets"]), f"{above['served']:.3f}", str(above["meets"]), "yes" if holds else "NO",
                     above["misses"])
    console.print(view)
    console.print(f"{holding} of {len(results) // 2} answers hold; capacity search {searched:.0f} s, re-runs "
                  f"{checked:.0f} s; wrote {out / 'check.csv'}")
    return 0 if holding == len(results) // 2 else 1


if __name__ == "__main__":
    sys.exit(main())
