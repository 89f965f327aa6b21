"""`pie-sim`: the simulator's command line."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress
from rich.table import Table

from hwmodels import CatalogError, CostModel, GiB, load_hardware, load_model
from pie_policy import ConfigError
from pie_policy.pipeline import PIPELINE_POLICIES
from pie_policy.registry import SIM, entry, names
from pie_serving.options import add_engine_arguments
from pie_serving.records import request_table
from traces import TraceError, load_trace

from .chrome_trace import write_chrome_trace
from .preview import SHARES, preview_all
from .capacity import search
from .capacity_report import capacity_row, capacity_table, write_rows
from .parallel import run_parallel
from .scenario import Scenario, simulate_scenario, workload_of
from .sweep import BACKENDS, load_grid, run_sweep, todo, varying_options, write_results


DEFAULT_HW = "gh200-96g,h100-pcie5,h200-pcie5,a100-80g-pcie4"
COMPARED = "vllm,vllm-swap,static,pie,flexgen"  # compare's default: the baselines on one GPU and Pie


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def cmd_preview(args: argparse.Namespace, console: Console) -> None:
    table = load_trace(args.trace)
    context = int(round((table.prompt_tokens + table.output_tokens).mean()))
    models = [load_model(name) for name in _names(args.model)]
    systems = [load_hardware(name) for name in _names(args.hw)]
    pairs = [CostModel(hw, model) for model in models for hw in systems]
    rows, curves, skipped = preview_all(pairs, context, args.gpu_mem_util, args.max_seqs)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    view = Table(title=f"Cost-model preview: decode at mean context {context} tokens ({args.trace}), "
                       f"gpu_mem_util {args.gpu_mem_util}, max {args.max_seqs} sequences")
    for header in ("hardware", "model", "weights\nGiB", "KV pool\nGiB", "GPU-only\nbatch", "GPU-only\ntok/s",
                   "best CPU\nshare", "pooled\nbatch", "pooled\ntok/s", "gain"):
        view.add_column(header, justify="left" if header in ("hardware", "model") else "right")
    for r in rows:
        view.add_row(r.hw, r.model, f"{r.weights_gib:.1f}", f"{r.kv_pool_gib:.1f}", str(r.gpu_only_batch),
                     f"{r.gpu_only_tok_s:,.0f}", f"{r.best_cpu_share:.0%}", str(r.pooled_batch),
                     f"{r.pooled_tok_s:,.0f}", f"{r.gain:.2f}x")
    console.print(view)
    for reason in skipped:
        console.print(f"[yellow]skipped:[/] {reason}")

    with open(out / "preview.csv", "w", newline="") as f:
        writer = csv.writer(f)
        fields = [field.name for field in dataclasses.fields(rows[0])] if rows else []
        writer.writerow(fields + ["gain"])
        writer.writerows([getattr(r, n) for n in fields] + [r.gain] for r in rows)
    from .plots import plot_preview  # here: matplotlib takes half a second to import

    plot_preview(SHARES, rows, curves, out / "preview.png")
    console.print(f"wrote {out / 'preview.csv'} and {out / 'preview.png'}")


def _load(rate: float | None) -> str:
    if rate is None:
        return " at the trace's times"
    return " all at once" if rate == float("inf") else f" at {rate:g}/s"


# What `plot_runs` draws: only these go to the painter process (the iterations' already cut to the plot's
# envelope, as plot_runs would cut them).
PLOTTED_REQUESTS = ("finish_s", "e2e_s", "output_tokens")
PLOTTED_ITERATIONS = ("gpu_kv_bytes", "cpu_kv_bytes", "cpu_share")


def _import_plots() -> None:
    from . import plots  # noqa: F401  (in the painter process, while the main one simulates)


def _plot_runs(*args) -> None:
    from .plots import plot_runs

    plot_runs(*args)


def _simulate_policies(args: argparse.Namespace, policies: list[str], console: Console) -> dict:
    """Run each policy on the same requests; write each one's files under --out; returns the summaries.
    The plot is drawn by a second process (the painter, forked: it starts with this one's modules), which
    imports matplotlib while this one simulates and draws while this one writes the files."""
    with ProcessPoolExecutor(1, mp_context=get_context("fork")) as painter:
        painter.submit(_import_plots)
        summaries, runs, title = _simulate(args, policies, console)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        drawing = painter.submit(_plot_runs, runs, Path(args.out) / "runs.png", title)
        for name, (summary, folder, result) in summaries.items():
            result.recorder.write(folder, result.requests, summary)
            if result.timeline is not None:
                write_chrome_trace(result.timeline, folder / "timeline.json")
        drawing.result()
    return {name: summary for name, (summary, _, _) in summaries.items()}


def scenario_of(args: argparse.Namespace, policy: str) -> Scenario:
    """The run a command line's workload and engine options name, for `policy`."""
    return Scenario.from_options({name: getattr(args, name) for name in Scenario.options() if name != "policy"}
                                 | {"policy": policy})


def _simulate(args: argparse.Namespace, policies: list[str], console: Console):
    """({policy: (summary, its folder, result)}, what the plot needs, the plot's title)."""
    for name in policies:
        entry(name, SIM)
    out = Path(args.out)
    summaries, runs = {}, {}
    with Progress(console=console, transient=True) as bar:
        for name in policies:
            scenario = scenario_of(args, name)
            task = bar.add_task(f"{name:9s}", total=len(workload_of(scenario)))
            summary, result = simulate_scenario(scenario, layer_events=args.layer_events,
                                                traced_iterations=args.trace_iterations,
                                                on_finish=lambda n, task=task: bar.advance(task, n))
            bar.update(task, visible=False)
            summaries[name] = (summary, out / name if len(policies) > 1 else out, result)
            requests = request_table(result.requests)
            runs[name] = ({k: requests[k] for k in PLOTTED_REQUESTS}, result.recorder.envelope(PLOTTED_ITERATIONS))
    return summaries, runs, (f"{summary['model']} on {summary['hw']}, {args.trace}, {len(result.requests)} "
                             f"requests{_load(args.rate)}")


SUMMARY_COLUMNS = (("throughput_tok_s", "output tok/s", "{:,.0f}"), ("throughput_req_s", "req/s", "{:.2f}"),
                   ("normalized_latency_s", "norm. latency s/tok", "{:.4f}"), ("ttft_p99_s", "TTFT p99 s", "{:.2f}"),
                   ("tpot_mean_s", "TPOT mean s", "{:.4f}"), ("total_stall_s", "stall s", "{:.2f}"),
                   ("total_bytes_h2d", "H2D GiB", "{:,.1f}"), ("peak_cpu_kv_bytes", "peak CPU KV GiB", "{:.1f}"),
                   ("rejected", "rejected", "{}"), ("wall_s", "wall s", "{:.1f}"))


def _show(summaries: dict, console: Console, title: str) -> None:
    view = Table(title=title)
    view.add_column("policy")
    for _, header, _ in SUMMARY_COLUMNS:
        view.add_column(header, justify="right")
    for name, s in summaries.items():
        cells = []
        for key, _, fmt in SUMMARY_COLUMNS:
            value = s[key]
            if value is not None and key in ("total_bytes_h2d", "peak_cpu_kv_bytes"):
                value = value / GiB
            cells.append("-" if value is None else fmt.format(value))
        view.add_row(name, *cells)
    console.print(view)


def cmd_run(args: argparse.Namespace, console: Console) -> None:
    summaries = _simulate_policies(args, [args.policy], console)
    _show(summaries, console, f"pie-sim run: {args.model} on {args.hw}")
    trace = "" if args.policy in PIPELINE_POLICIES else " timeline.json,"
    console.print(f"wrote {args.out}/requests.csv, iterations.csv, summary.json,{trace} runs.png")


def cmd_compare(args: argparse.Namespace, console: Console) -> None:
    summaries = _simulate_policies(args, _names(args.policies), console)
    out = Path(args.out)
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, sorted({k for s in summaries.values() for k in s}))
        writer.writeheader()
        writer.writerows(summaries.values())
    _show(summaries, console, f"pie-sim compare: {args.model} on {args.hw}, {args.trace}, "
                              f"{args.num_requests} requests{_load(args.rate)}")
    console.print(f"wrote {out}/compare.csv, {out}/runs.png and each policy's files in {out}/<policy>/")


def cmd_capacity(args: argparse.Namespace, console: Console) -> None:
    """The capacity question for every system x policy, searched in parallel; capacity.csv and probes.csv."""
    if args.min_hbm != (args.rate is not None):
        raise ConfigError("--min-hbm needs --rate (the req/s the least HBM must sustain); without --min-hbm "
                          "the rate is what capacity searches")
    pairs = [(hw, policy) for hw in _names(args.hw) for policy in _names(args.policy)]
    jobs = [(scenario_of(args, policy).replace(hw=hw), args.slo_normalized_latency, args.tolerance, args.min_hbm)
            for hw, policy in pairs]
    answers = run_parallel(search, jobs, console, "capacity searches", args.workers)
    rows = [capacity_row(job[0], answer, args.min_hbm) for job, answer in zip(jobs, answers)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "capacity.csv", rows)
    write_rows(out / "probes.csv", [dict(hw=job[0].hw, policy=job[0].policy, **dataclasses.asdict(p))
                                    for job, answer in zip(jobs, answers) for p in answer.probes])
    question = (f"least HBM for {args.rate:g} req/s" if args.min_hbm else "highest request rate") + \
        f" within {args.slo_normalized_latency:g} s/token normalized latency"
    console.print(capacity_table(rows, f"pie-sim capacity: {question}; {args.model}, {args.trace}, "
                                       f"{args.num_requests} requests, tolerance {args.tolerance:.0%}"))
    for row in rows:
        if row["bound"] != "found":
            console.print(f"[yellow]{row['hw']} {row['policy']}:[/] {row['note']}")
    console.print(f"wrote {out}/capacity.csv and {out}/probes.csv")


def cmd_reproduce(args: argparse.Namespace, console: Console) -> None:
    from . import reproduce
    from .reproduce_report import plot_curves, write_report, write_tables

    grid = reproduce.QUICK if args.quick else reproduce.FULL
    panels = reproduce.run(grid, args.hw, console, args.workers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_tables(panels, out)
    plot_curves(panels, grid, out / "latency_vs_rate.png")
    claims = write_report(panels, grid, args.quick, out / "report.md")
    view = Table(title=f"Pie's published claims beside the simulator ({args.hw}, {grid.num_requests} requests a run)")
    for header in ("claim", "published", "simulated", "panel"):
        view.add_column(header)
    for row in claims:
        view.add_row(*row)
    console.print(view)
    console.print(f"wrote {out}/report.md (with the reasons), latency_vs_rate.png, offline.csv, curves.csv, "
                  f"searches.csv")


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    """Exit status 1 when a point failed (its error is in the table), 130 when interrupted."""
    if args.address and args.backend != "ray":
        raise ConfigError("--address names a Ray cluster: it needs --backend ray")
    points, out = load_grid(args.grid), Path(args.out)
    remaining, axes = todo(points, out), varying_options(points)

    def say(text: str) -> None:  # unwrapped: paths and errors stay whole for grep
        console.print(text, highlight=False, soft_wrap=True)

    def report(record: dict) -> None:
        bar.advance(task)
        if record["error"]:
            point = " ".join(f"{k}={record['options'][k]}" for k in axes) or record["point"]
            say(f"[red]failed[/] {point}: {record['error']}")

    say(f"{len(points)} points in {args.grid}; skipped {len(points) - len(remaining)} already finished; "
        f"running {len(remaining)} ({args.backend})")
    try:
        with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), console=console,
                      transient=True) as bar:
            task = bar.add_task("sweep", total=len(remaining))
            run_sweep(remaining, out, backend=args.backend, workers=args.workers, address=args.address,
                      on_record=report)
    except KeyboardInterrupt:
        write_results(points, out)
        say(f"interrupted: the finished points are saved in {out / 'points'}; run the same command to go on")
        return 130
    failed = int((write_results(points, out)["status"] == "error").sum())
    say(f"{len(points) - failed} points ok, {failed} failed; wrote {out / 'results.parquet'} and "
        f"{out / 'results.csv'}")
    return 1 if failed else 0


def _workload_options(p: argparse.ArgumentParser, policy_option) -> None:
    p.add_argument("--hw", default="gh200-96g", help="system name or TOML file")
    p.add_argument("--model", default="opt-13b", help="model name or TOML file")
    p.add_argument("--trace", default="sharegpt", help="trace name or CSV/JSONL file")
    p.add_argument("--num-requests", type=int, default=500, help="requests to take (0: the whole trace)")
    p.add_argument("--rate", type=float, help="re-time arrivals as Poisson at this rate (req/s; inf: all at 0); "
                                              "default: the trace's own timestamps")
    p.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of the gaps (Gamma when != 1)")
    policy_option(p)
    p.add_argument("--cpu-mem-gb", type=float, help="CPU memory for KV (flexgen: for all it offloads), GiB "
                   "(default: 240 or the host's memory)")
    p.add_argument("--gpu-mem-util", type=float, default=0.9)
    add_engine_arguments(p)
    p.add_argument("--micro-batches", type=int, help="pp-vllm, pipemax: micro-batches in the pipeline "
                                                     "(default: one per GPU of --hw)")
    p.add_argument("--layer-events", action="store_true",
                   help="one SimPy event per layer and copy instead of the recurrence (slow; for checking)")
    p.add_argument("--trace-iterations", type=int, default=3, help="iterations to draw in timeline.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pie-sim", description="Pie's simulator of CPU-pooled LLM inference.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("preview", help="closed-form cost-model preview of CPU pooling per system")
    p.add_argument("--hw", default=DEFAULT_HW, help=f"comma-separated systems or TOML files (default {DEFAULT_HW})")
    p.add_argument("--model", default="opt-13b,opt-30b", help="comma-separated models or TOML files")
    p.add_argument("--trace", default="sharegpt", help="trace name or CSV/JSONL file (sets the mean context)")
    p.add_argument("--gpu-mem-util", type=float, default=0.9, help="share of HBM the engine may use")
    p.add_argument("--max-seqs", type=int, default=256, help="most sequences in one batch (vLLM's default)")
    p.add_argument("--out", default="out/preview", help="folder for preview.csv and preview.png")
    p.set_defaults(run=cmd_preview)

    p = commands.add_parser("run", help="simulate one policy on a workload")
    _workload_options(p, lambda q: q.add_argument("--policy", default="pie", help=", ".join(names(backend=SIM))))
    p.add_argument("--out", required=True, help="folder for the run's files")
    p.set_defaults(run=cmd_run)

    p = commands.add_parser("compare", help="simulate several policies on the same requests")
    _workload_options(p, lambda q: q.add_argument("--policies", default=COMPARED))
    # The default is a KV-limited serving load: GH200 with half its HBM for the engine, where vLLM preempts.
    p.set_defaults(rate=20.0, gpu_mem_util=0.5, num_requests=600)
    p.add_argument("--out", default="out/compare", help="folder for compare.csv, runs.png and per-policy files")
    p.set_defaults(run=cmd_compare)

    p = commands.add_parser("capacity", help="highest request rate within an SLO, or least HBM for a rate")
    _workload_options(p, lambda q: q.add_argument("--policy", default="pie,vllm",
                                                  help="comma-separated policies (default pie,vllm)"))
    # The question: OPT-30B within 0.2 s/token (OPT-13B meets it even with 1,000 requests at once).
    p.set_defaults(num_requests=1000, hw="gh200-96g,h100-pcie5,h200-pcie5", model="opt-30b")
    p.add_argument("--slo-normalized-latency", type=float, default=0.2,
                   help="SLO on mean end-to-end latency per output token, s/token (default 0.2)")
    p.add_argument("--tolerance", type=float, default=0.02, help="relative bisection tolerance (default 0.02)")
    p.add_argument("--min-hbm", action="store_true", help="search the least HBM (gpu_mem_util) that sustains --rate")
    p.add_argument("--workers", type=int, help="parallel searches (default: one per CPU core)")
    p.add_argument("--out", default="out/capacity", help="folder for capacity.csv and probes.csv")
    p.set_defaults(run=cmd_capacity)

    p = commands.add_parser("reproduce", help="the Pie paper's experiments in simulation, with a report")
    p.add_argument("--quick", action="store_true", help="fewer requests and rates (about a minute)")
    p.add_argument("--hw", default="gh200-96g", help="system (the paper's: gh200-96g)")
    p.add_argument("--workers", type=int, help="parallel runs (default: one per CPU core)")
    p.add_argument("--out", default="out/reproduce", help="folder for report.md, plots and tables")
    p.set_defaults(run=cmd_reproduce)

    p = commands.add_parser("sweep", help="run every combination of a grid's options, resumably")
    p.add_argument("grid", help="GRID.toml: run options, a list for each axis (format: pie_sim/sweep.py)")
    p.add_argument("--out", required=True, help="folder for points/ and results.parquet, results.csv")
    p.add_argument("--workers", type=int, help="local: processes (default: the CPU count); ray: most points "
                                               "in flight (default: all)")
    p.add_argument("--backend", choices=BACKENDS, default="local")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS or a new local Ray)")
    p.set_defaults(run=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(width=max(Console().width, 120))
    try:
        return args.run(args, console) or 0
    except (CatalogError, TraceError, ConfigError, ValueError) as e:
        console.print(f"[red]pie-sim: error:[/] {e}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
