"""`pie-sim`: the simulator's command line."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress
from rich.table import Table

from hwmodels import CatalogError, CostModel, GiB, load_hardware, load_model
from pie_policy import ConfigError
from pie_policy.pipeline import PIPELINE_POLICIES
from pie_policy.registry import REGISTRY, SIM, names
from pie_serving.options import (CV_HELP, Interrupted, Parser, add_engine_arguments, add_force_argument, check_cv,
                                 fraction, name_list, non_negative_int, open_fraction, positive_float, positive_int,
                                 run_cli)
from pie_serving.outputs import OutputError, check_folder, output_folder
from pie_serving.processes import worker_pool
from pie_serving.records import request_table
from traces import TraceError, load_trace

from .chrome_trace import write_chrome_trace
from .preview import SHARES, preview_all
from .capacity import search
from .capacity_report import capacity_row, capacity_table, write_rows
from .parallel import run_parallel
from .scenario import RULES, Scenario, check_policy_options, simulate_scenario, workload_of
from .sweep import BACKENDS, load_grid, run_sweep, todo, varying_options, write_results


DEFAULT_HW = "gh200-96g,h100-pcie5,h200-pcie5,a100-80g-pcie4"
COMPARED = "vllm,vllm-swap,static,pie,flexgen"  # compare's default: the baselines on one GPU and Pie

# What each command writes in its --out (docs/DESIGN.md, "Outputs"): --force replaces these and keeps the rest.
# The last one named is moved in last: a folder that has it holds the whole run.
RUN_FILES = ("requests.csv", "iterations.csv", "timeline.json", "runs.png", "summary.json")
COMPARE_FILES = (*RUN_FILES, *REGISTRY, "compare.csv")
PREVIEW_FILES = ("preview.png", "preview.csv")
CAPACITY_FILES = ("probes.csv", "capacity.csv")
REPRODUCE_FILES = ("latency_vs_rate.png", "offline.csv", "curves.csv", "searches.csv", "report.md")


def _output(args: argparse.Namespace, owned: tuple[str, ...]):
    """The command's --out, written whole or not at all (pie_serving.outputs)."""
    return output_folder(args.out, owned, args.force, last=owned[-1])


def cmd_preview(args: argparse.Namespace, console: Console) -> None:
    table = load_trace(args.trace)
    context = int(round((table.prompt_tokens + table.output_tokens).mean()))
    models = [load_model(name) for name in args.model]
    systems = [load_hardware(name) for name in args.hw]
    pairs = [CostModel(hw, model) for model in models for hw in systems]
    with _output(args, PREVIEW_FILES) as out:
        _preview(args, pairs, context, out, console)
    console.print(f"wrote {Path(args.out) / 'preview.csv'} and {Path(args.out) / 'preview.png'}")


def _preview(args: argparse.Namespace, pairs: list[CostModel], context: int, out: Path, console: Console) -> None:
    rows, curves, skipped = preview_all(pairs, context, args.gpu_mem_util, args.max_num_seqs)
    view = Table(title=f"Cost-model preview: decode at mean context {context} tokens ({args.trace}), "
                       f"gpu_mem_util {args.gpu_mem_util}, max {args.max_num_seqs} sequences")
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


def _load(rate: float | None) -> str:
    if rate is None:
        return " at the trace's times"
    return " all at once" if rate == float("inf") else f" at {rate:g}/s"


# What `plot_runs` draws: only these go to the painter process.
PLOTTED_REQUESTS = ("finish_s", "e2e_s", "output_tokens")
PLOTTED_ITERATIONS = ("end_s", "gpu_kv_bytes", "cpu_kv_bytes", "cpu_share")


def _import_plots() -> None:
    from . import plots  # noqa: F401  (in the painter process, while the main one simulates)


def _plot_runs(*args) -> None:
    from .plots import plot_runs

    plot_runs(*args)


def check_policies(args: argparse.Namespace, policies: list[str]) -> None:
    """The rules that span options (`check_policy_options`), and --cv only with --rate (it shapes re-timed
    gaps)."""
    check_policy_options(policies, args.micro_batches, args.share)
    args.cv = check_cv(args)


def _simulate_policies(args: argparse.Namespace, policies: list[str], console: Console, out: Path) -> dict:
    """Run each policy on the same requests; write each one's files under `out`; returns the summaries.
    The plot is drawn by a second process (the painter, forked: it starts with this one's modules), which
    imports matplotlib while this one simulates and draws while this one writes the files."""
    with worker_pool(1, _import_plots) as painter:
        summaries, runs, title = _simulate(args, policies, console)
        drawing = painter.submit(_plot_runs, runs, out / "runs.png", title)
        for name, (summary, result) in summaries.items():
            folder = out / name if len(policies) > 1 else out
            folder.mkdir(exist_ok=True)
            result.recorder.write(folder, result.requests, summary)
            if result.timeline is not None:
                write_chrome_trace(result.timeline, folder / "timeline.json")
        drawing.result()
    return {name: summary for name, (summary, _) in summaries.items()}


def scenario_of(args: argparse.Namespace, policy: str) -> Scenario:
    """The run a command line's workload and engine options name, for `policy`."""
    return Scenario.from_options({name: getattr(args, name) for name in Scenario.options() if name != "policy"}
                                 | {"policy": policy})


def _simulate(args: argparse.Namespace, policies: list[str], console: Console):
    """({policy: (summary, result)}, what the plot needs, the plot's title)."""
    summaries, runs = {}, {}
    with Progress(console=console, transient=True) as bar:
        for name in policies:
            scenario = scenario_of(args, name)
            task = bar.add_task(f"{name:9s}", total=len(workload_of(scenario)))
            summary, result = simulate_scenario(scenario, layer_events=args.layer_events,
                                                traced_iterations=args.trace_iterations,
                                                on_finish=lambda n, task=task: bar.advance(task, n))
            bar.update(task, visible=False)
            summaries[name] = (summary, result)
            requests, its = request_table(result.requests), result.recorder.iterations
            runs[name] = ({k: requests[k] for k in PLOTTED_REQUESTS}, {k: its[k] for k in PLOTTED_ITERATIONS})
    return summaries, runs, (f"{summary['model']} on {summary['hw']} (gpu_mem_util {args.gpu_mem_util:g}), "
                             f"{args.trace}, {len(result.requests)} requests{_load(args.rate)}")


SUMMARY_COLUMNS = (("throughput_tok_s", "output tok/s", "{:,.0f}"), ("throughput_req_s", "req/s", "{:.2f}"),
                   ("normalized_latency_s", "norm. latency s/tok", "{:.4f}"), ("ttft_p99_s", "TTFT p99 s", "{:.2f}"),
                   ("tpot_mean_s", "TPOT mean s", "{:.4f}"), ("preemptions", "preempt.", "{:,}"),
                   ("total_stall_s", "stall s", "{:.2f}"),
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
    check_policies(args, [args.policy])
    with _output(args, RUN_FILES) as out:
        summaries = _simulate_policies(args, [args.policy], console, out)
    _show(summaries, console, f"pie-sim run: {args.model} on {args.hw}")
    trace = "" if args.policy in PIPELINE_POLICIES else " timeline.json,"
    console.print(f"wrote {args.out}/requests.csv, iterations.csv, summary.json,{trace} runs.png")


def cmd_compare(args: argparse.Namespace, console: Console) -> None:
    check_policies(args, args.policies)
    with _output(args, COMPARE_FILES) as out:
        summaries = _simulate_policies(args, args.policies, console, out)
        with open(out / "compare.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, sorted({k for s in summaries.values() for k in s}))
            writer.writeheader()
            writer.writerows(summaries.values())
    _show(summaries, console, f"pie-sim compare: {args.model} on {args.hw} (gpu_mem_util {args.gpu_mem_util:g}), "
                              f"{args.trace}, {args.num_requests} requests{_load(args.rate)}")
    out = Path(args.out)
    console.print(f"wrote {out}/compare.csv, {out}/runs.png and each policy's files in {out}/<policy>/")


def cmd_capacity(args: argparse.Namespace, console: Console) -> None:
    """The capacity question for every system x policy, searched in parallel; capacity.csv and probes.csv."""
    if args.min_hbm != (args.rate is not None):
        raise ConfigError("--min-hbm needs --rate (the req/s the least HBM must sustain); without --min-hbm "
                          "the rate is what capacity searches")
    args.layer_events, args.trace_iterations = False, 0
    check_policies(args, args.policy)
    pairs = [(hw, policy) for hw in args.hw for policy in args.policy]
    jobs = [(scenario_of(args, policy).replace(hw=hw), args.slo_normalized_latency, args.tolerance, args.min_hbm)
            for hw, policy in pairs]
    with _output(args, CAPACITY_FILES) as out:
        answers = run_parallel(search, jobs, console, "capacity searches", args.workers)
        rows = [capacity_row(job[0], answer, args.min_hbm) for job, answer in zip(jobs, answers)]
        write_rows(out / "capacity.csv", rows)
        write_rows(out / "probes.csv", [dict(hw=job[0].hw, policy=job[0].policy, **dataclasses.asdict(p))
                                        for job, answer in zip(jobs, answers) for p in answer.probes])
    out = Path(args.out)
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
    load_hardware(args.hw)  # refused before minutes of runs
    with _output(args, REPRODUCE_FILES) as out:
        panels = reproduce.run(grid, args.hw, console, args.workers)
        write_tables(panels, out)
        plot_curves(panels, grid, out / "latency_vs_rate.png")
        claims = write_report(panels, grid, args.quick, out / "report.md")
    out = Path(args.out)
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
    check_folder(out, force=True)  # its own earlier points are what a re-run resumes from
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
    except (KeyboardInterrupt, Interrupted):
        write_results(points, out)
        say(f"interrupted: the finished points are saved in {out / 'points'}; run the same command to go on")
        return 130
    failed = int((write_results(points, out)["status"] == "error").sum())
    say(f"{len(points) - failed} points ok, {failed} failed; wrote {out / 'results.parquet'} and "
        f"{out / 'results.csv'}")
    return 1 if failed else 0


def _workload_options(p: argparse.ArgumentParser, policy_option, single_runs: bool = True) -> None:
    """The options of one simulated point (`Scenario`). `single_runs`: the command writes each run's files
    (run, compare), so it takes the options that only shape them (--layer-events, --trace-iterations)."""
    many = not single_runs  # capacity searches several systems
    p.add_argument("--hw", type=name_list if many else str, default="gh200-96g",
                   help="comma-separated systems or TOML files" if many else "system name or TOML file")
    p.add_argument("--model", default="opt-13b", help="model name or TOML file")
    p.add_argument("--trace", default="sharegpt", help="trace name or CSV/JSONL file")
    p.add_argument("--num-requests", type=RULES["num_requests"], default=500, help="requests to take (0: the whole trace)")
    p.add_argument("--rate", type=RULES["rate"], help="re-time arrivals as Poisson at this rate (req/s; inf: all at 0; "
                                             "default: the trace's own timestamps)")
    p.add_argument("--cv", type=RULES["cv"], help=CV_HELP + " (default 1)")
    policy_option(p)
    p.add_argument("--cpu-mem-gb", type=RULES["cpu_mem_gb"], help="CPU memory for KV (flexgen: for all it "
                   "offloads), GiB (default: 240 or the host's memory)")
    p.add_argument("--gpu-mem-util", type=RULES["gpu_mem_util"], default=0.9, help="share of HBM the engine may "
                   "use (weights, activations, KV pool)")
    add_engine_arguments(p)
    p.add_argument("--micro-batches", type=RULES["micro_batches"], help="pp-vllm, pipemax: micro-batches in the pipeline "
                                                              "(default: one per GPU of --hw)")
    if single_runs:
        p.add_argument("--layer-events", action="store_true",
                       help="one SimPy event per layer and copy instead of the recurrence (slow; for checking)")
        p.add_argument("--trace-iterations", type=non_negative_int, default=3,
                       help="iterations to draw in timeline.json")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pie-sim", description="Pie's simulator of CPU-pooled LLM inference.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("preview", help="closed-form cost-model preview of CPU pooling per system")
    p.add_argument("--hw", type=name_list, default=DEFAULT_HW, help="comma-separated systems or TOML files")
    p.add_argument("--model", type=name_list, default="opt-13b,opt-30b", help="comma-separated models or TOML files")
    p.add_argument("--trace", default="sharegpt", help="trace name or CSV/JSONL file (sets the mean context)")
    p.add_argument("--gpu-mem-util", type=fraction, default=0.9, help="share of HBM the engine may use")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="most sequences in one batch (vLLM's "
                                                                          "--max-num-seqs)")
    p.add_argument("--out", default="out/preview", help="folder for preview.csv and preview.png")
    add_force_argument(p)
    p.set_defaults(run=cmd_preview)

    p = commands.add_parser("run", help="simulate one policy on a workload")
    _workload_options(p, lambda q: q.add_argument("--policy", default="pie", help=", ".join(names(backend=SIM))))
    p.add_argument("--out", required=True, help="folder for the run's files")
    add_force_argument(p)
    p.set_defaults(run=cmd_run)

    p = commands.add_parser("compare", help="simulate several policies on the same requests")
    _workload_options(p, lambda q: q.add_argument("--policies", type=name_list, default=COMPARED,
                                                  help="comma-separated: " + ", ".join(names(backend=SIM))))
    # The default is a KV-limited serving load: GH200 with half its HBM for the engine, where vLLM preempts.
    p.set_defaults(rate=20.0, gpu_mem_util=0.5, num_requests=600)
    p.add_argument("--out", default="out/compare", help="folder for compare.csv, runs.png and per-policy files")
    add_force_argument(p)
    p.set_defaults(run=cmd_compare)

    p = commands.add_parser("capacity", help="highest request rate within an SLO, or least HBM for a rate")
    _workload_options(p, lambda q: q.add_argument("--policy", type=name_list, default="pie,vllm",
                                                  help="comma-separated policies"), single_runs=False)
    # The question: OPT-30B within 0.2 s/token (OPT-13B meets it even with 1,000 requests at once).
    p.set_defaults(num_requests=1000, hw="gh200-96g,h100-pcie5,h200-pcie5", model="opt-30b")
    p.add_argument("--slo-normalized-latency", type=positive_float, default=0.2,
                   help="SLO on mean end-to-end latency per output token, s/token")
    p.add_argument("--tolerance", type=open_fraction, default=0.02, help="relative bisection tolerance")
    p.add_argument("--min-hbm", action="store_true", help="search the least HBM (gpu_mem_util) that sustains --rate")
    p.add_argument("--workers", type=positive_int, help="parallel searches (default: one per CPU core)")
    p.add_argument("--out", default="out/capacity", help="folder for capacity.csv and probes.csv")
    add_force_argument(p)
    p.set_defaults(run=cmd_capacity)

    p = commands.add_parser("reproduce", help="the Pie paper's experiments in simulation, with a report")
    p.add_argument("--quick", action="store_true", help="fewer requests and rates (a smoke run)")
    p.add_argument("--hw", default="gh200-96g", help="system (the paper's: gh200-96g)")
    p.add_argument("--workers", type=positive_int, help="parallel runs (default: one per CPU core)")
    p.add_argument("--out", default="out/reproduce", help="folder for report.md, plots and tables")
    add_force_argument(p)
    p.set_defaults(run=cmd_reproduce)

    p = commands.add_parser("sweep", help="run every combination of a grid's options, resumably")
    p.add_argument("grid", help="GRID.toml: run options, a list for each axis (format: pie_sim/sweep.py)")
    p.add_argument("--out", required=True, help="folder for points/ and results.parquet, results.csv; run again "
                                                "with the same --out to resume")
    p.add_argument("--workers", type=positive_int, help="local: processes (default: the CPU count); ray: most "
                                                        "points in flight (default: all)")
    p.add_argument("--backend", choices=BACKENDS, default="local", help="where the points run")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS or a new local Ray)")
    p.set_defaults(run=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv, (CatalogError, TraceError, ConfigError, OutputError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
