"""`pie-sim`: the simulator's command line."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress
from rich.table import Table

from hwmodels import CatalogError, CostModel, GiB, load_hardware, load_model
from pie_policy import ConfigError
from pie_policy.pipeline import PIPELINE_POLICIES
from pie_policy.registry import REGISTRY, SIM, names
from pie_serving.benchmark import request_rate
from pie_serving.options import (
    CV_HELP,
    Interrupted,
    Parser,
    add_engine_arguments,
    add_force_argument,
    add_metric_arguments,
    check_cv,
    fraction,
    metric_settings,
    name_list,
    non_negative_int,
    open_fraction,
    positive_int,
    run_cli,
)
from pie_serving.outputs import OutputError, check_folder, output_folder
from pie_serving.processes import worker_pool
from pie_serving.records import cpu_percent, request_table
from pie_serving.slo import Slo, parse_slos
from traces import FORMATS, TraceError, load_trace

from .capacity import CONFIRM, Job, search
from .capacity_report import binding_lines, capacity_row, capacity_table, probe_rows, write_rows
from .chrome_trace import write_chrome_trace
from .oracle import (
    FIXED,
    check_room,
    link_bound,
    run_one,
    runs_of,
    share_range,
    verdict,
)
from .oracle import label as run_label
from .parallel import run_parallel
from .preview import SHARES, preview_all
from .scenario import RULES, Scenario, check_policy_options, simulate_scenario, workload_of
from .steady_state import check_window
from .sweep import BACKENDS, load_grid, run_sweep, todo, varying_options, write_results

DEFAULT_HW = "gh200-96g,h100-sxm-pcie5,h200-sxm-pcie5,a100-80g-sxm-pcie4"
COMPARED = "vllm,vllm-swap,static,pie,flexgen"  # compare's default: the baselines on one GPU and Pie
# capacity's: MLPerf Inference's server latency constraints for an interactive LLM (Llama-2-70B: 99th
# percentile TTFT 2 s, TPOT 200 ms; mlcommons/inference, loadgen/mlperf.conf)
DEFAULT_SLOS = ("ttft_p99=2", "tpot_p99=0.2")

# What each command writes in its --out (docs/DESIGN.md, "Outputs"): --force replaces these and keeps the rest.
# The last one named is moved in last: a folder that has it holds the whole run.
RUN_FILES = ("requests.csv", "iterations.csv", "benchmark.json", "timeline.json", "runs.png", "summary.json")
COMPARE_FILES = (*RUN_FILES, *REGISTRY, "compare.csv")
PREVIEW_FILES = ("preview.png", "preview.csv")
CAPACITY_FILES = ("probes.csv", "capacity.csv")
ORACLE_FILES = ("warmup.png", "oracle.csv")
REPRODUCE_FILES = ("latency_vs_rate.png", "offline.csv", "curves.csv", "searches.csv", "map.csv", "report.md")


def _output(args: argparse.Namespace, owned: tuple[str, ...]):
    """The command's --out, written whole or not at all (pie_serving.outputs)."""
    return output_folder(args.out, owned, args.force, last=owned[-1])


def cmd_preview(args: argparse.Namespace, console: Console) -> None:
    table = load_trace(args.trace, args.trace_format)
    context = int(round((table.prompt_tokens + table.output_tokens).mean()))
    models = [load_model(name) for name in args.model]
    systems = [load_hardware(name) for name in args.hw]
    pairs = [CostModel(hw, model, args.tp) for model in models for hw in systems]
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


# What `plot_runs` draws: only these go to the painter process (the iterations' already cut to the plot's
# envelope, as plot_runs would cut them, with the CPU share of the KV held made row by row before the cut).
PLOTTED_REQUESTS = ("finish_s", "e2e_s", "output_tokens")
PLOTTED_ITERATIONS = ("gpu_kv_bytes", "cpu_kv_bytes")


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
    percentiles, slos = metric_settings(args)
    with worker_pool(1, _import_plots) as painter:
        summaries, runs, title = _simulate(args, policies, console)
        drawing = painter.submit(_plot_runs, runs, out / "runs.png", title)
        for name, (summary, result) in summaries.items():
            folder = out / name if len(policies) > 1 else out
            folder.mkdir(exist_ok=True)
            benchmark = result.recorder.benchmark(
                result.requests, percentiles, slos, backend="pie-sim", model_id=summary["model"], hw=summary["hw"],
                policy=name, trace=str(args.trace), num_prompts=len(result.requests), request_rate=request_rate(args.rate),
                burstiness=1 / args.cv**2, seed=args.seed)
            result.recorder.write(folder, result.requests, summary, benchmark)
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
                                                traced_iterations=args.trace_iterations, token_gaps=True,
                                                on_finish=lambda n, task=task: bar.advance(task, n))
            bar.update(task, visible=False)
            summaries[name] = (summary, result)
            requests = request_table(result.requests)
            runs[name] = ({k: requests[k] for k in PLOTTED_REQUESTS},
                          result.recorder.envelope(PLOTTED_ITERATIONS, derived={"cpu_percent": cpu_percent}))
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
    view.add_column("policy", no_wrap=True)
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
    console.print(f"wrote {args.out}/requests.csv, iterations.csv, summary.json, benchmark.json,{trace} runs.png")


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


def cmd_oracle(args: argparse.Namespace, console: Console) -> None:
    """The scenario at every fixed share of the range, pie and vllm beside them; oracle.csv, warmup.png."""
    if args.share is not None:
        raise ConfigError("--share: the oracle sweeps the share (--shares-from, --shares-to, --shares-step); "
                          "pie runs up to its own largest share")
    check_policies(args, ["pie", args.fixed, "vllm"])
    check_folder(Path(args.out), args.force)  # before minutes of runs
    base = scenario_of(args, "pie")
    top = link_bound(base) if args.shares_to is None else args.shares_to
    shares = share_range(args.shares_from, top, args.shares_step)
    check_room(base, args.fixed, shares[-1])
    scenarios = runs_of(base, args.fixed, shares)
    results = run_parallel(run_one, scenarios, console, "oracle runs", args.workers)
    labels = [run_label(s.policy, s.share) for s in scenarios]
    summaries = [summary for summary, _ in results]
    judged = verdict(shares, summaries)
    title = (f"{base.model} on {base.hw}, {base.trace}, {base.num_requests} requests{_load(base.rate)}, "
             f"gpu_mem_util {base.gpu_mem_util:g}")
    best = run_label(args.fixed, judged.best_share)
    with _output(args, ORACLE_FILES) as out:
        write_rows(out / "oracle.csv", [dict(run=name, share=s.share, **summary)
                                        for name, s, summary in zip(labels, scenarios, summaries)])
        from .plots import plot_warmup  # here: matplotlib takes half a second to import

        plot_warmup(dict(zip(labels, (t for _, t in results))), best, judged.best_share, out / "warmup.png", title)
    out = Path(args.out)
    _show(dict(zip(labels, summaries)), console, f"pie-sim oracle: {title}")
    console.print(f"best fixed share: {best} ({judged.best['throughput_tok_s']:,.0f} tok/s, "
                  f"{judged.best['normalized_latency_s']:.4f} s/token); pie: {judged.throughput_vs_best:.3f}x its "
                  f"throughput, {judged.throughput_vs_vllm:.3f}x vLLM's, {judged.latency_vs_best:.3f}x its "
                  f"normalized latency", highlight=False)
    misses = judged.failures
    console.print("pie meets the targets" if not misses else "pie misses: " + "; ".join(misses), highlight=False)
    console.print(f"wrote {out}/oracle.csv and {out}/warmup.png")


def capacity_options(args: argparse.Namespace) -> list[Slo]:
    """Check `capacity`'s options and fill in what they leave to defaults; returns its SLOs. The command and
    its check (bench/bench_capacity.py) read the same scenarios from them (`scenario_of`)."""
    if args.min_hbm != (args.rate is not None):
        raise ConfigError("--min-hbm needs --rate (the req/s the least HBM must sustain); without --min-hbm "
                          "the rate is what capacity searches")
    slos = parse_slos(args.slo if args.slo is not None else DEFAULT_SLOS)
    check_window(args.num_requests, slos)
    if args.min_hbm and not args.rate < math.inf:
        raise ConfigError(f"--rate {args.rate:g}: the least HBM is searched for a finite positive rate")
    args.layer_events, args.trace_iterations = False, 0
    check_policy_options(args.policy, args.micro_batches, args.share)
    args.cv = check_cv(args, retimed=True)  # every probe re-times the arrivals
    return slos


def cmd_capacity(args: argparse.Namespace, console: Console) -> None:
    """The capacity question for every system x policy, searched in parallel; capacity.csv and probes.csv."""
    slos = capacity_options(args)
    for hw in args.hw:
        load_hardware(hw)
    jobs = [Job(scenario_of(args, policy).replace(hw=hw), slos, args.tolerance, args.min_hbm, confirm=args.confirm)
            for hw in args.hw for policy in args.policy]
    with _output(args, CAPACITY_FILES) as out:
        answers = run_parallel(search, jobs, console, "capacity searches", args.workers)
        rows = [capacity_row(job, answer) for job, answer in zip(jobs, answers)]
        write_rows(out / "capacity.csv", rows)
        write_rows(out / "probes.csv", [row for job, answer in zip(jobs, answers) for row in probe_rows(job, answer)])
    out = Path(args.out)
    question = (f"least HBM (up to {args.gpu_mem_util:g}) sustaining {args.rate:g} req/s" if args.min_hbm
                else "highest sustainable request rate") + (f" within {', '.join(map(str, slos))}" if slos else ", no SLO")
    confirmed = f", answers confirmed with {args.confirm * args.num_requests}" if args.confirm > 1 else ""
    console.print(capacity_table(rows, [slo.name for slo in slos],
                                 f"pie-sim capacity: {question}; {args.model}, {args.trace}, {args.num_requests} "
                                 f"requests a probe{confirmed}, tolerance {args.tolerance:.0%}"))
    console.print("What binds:", highlight=False)
    for line in binding_lines(rows, args.min_hbm):
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    for row in rows:
        if row["note"]:
            console.print(f"[yellow]{row['hw']} {row['policy']}:[/] {row['note']}", highlight=False, soft_wrap=True)
    console.print(f"wrote {out}/capacity.csv and {out}/probes.csv (every probe with its window's figures)")


def cmd_reproduce(args: argparse.Namespace, console: Console) -> None:
    from . import reproduce
    from .reproduce_map import MAP_FULL, MAP_QUICK, map_rows, map_section, run_map
    from .reproduce_report import plot_curves, write_report, write_tables

    grid = reproduce.QUICK if args.quick else reproduce.FULL
    load_hardware(args.hw)  # refused before minutes of runs
    map_grid = MAP_QUICK if args.quick else MAP_FULL
    with _output(args, REPRODUCE_FILES) as out:
        panels = reproduce.run(grid, args.hw, console, args.workers)
        mapped = run_map([p.base for p in panels], [p.offline["vllm"]["throughput_req_s"] for p in panels],
                         map_grid, console, args.workers)
        write_tables(panels, out)
        write_rows(out / "map.csv", map_rows(mapped))
        plot_curves(panels, grid, out / "latency_vs_rate.png")
        claims = write_report(panels, grid, args.quick, out / "report.md", map_section(mapped, map_grid))
    out = Path(args.out)
    view = Table(title=f"Pie's published claims beside the simulator ({args.hw}, {grid.num_requests} requests a run)")
    for header in ("claim", "published", "simulated", "panel"):
        view.add_column(header)
    for row in claims:
        view.add_row(*row)
    console.print(view)
    console.print(f"wrote {out}/report.md (with the reasons and the map of where the claims hold), "
                  f"latency_vs_rate.png, offline.csv, curves.csv, searches.csv, map.csv")


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


def _trace_format_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace-format", default="auto", choices=("auto", *FORMATS),
                   help="a --trace file's format (default auto: by its extension, then its columns)")


MODEL_HELP = "model name, TOML file, Hugging Face config.json or model folder"
TRACE_HELP = "trace name or file (CSV/JSONL table, Azure or Vidur trace CSV, ShareGPT-format JSON)"


def _workload_options(p: argparse.ArgumentParser, policy_option, single_runs: bool = True) -> None:
    """The options of one simulated point (`Scenario`). `single_runs`: the command writes each run's files
    (run, compare), so it takes the options that only shape them (--layer-events, --trace-iterations)."""
    many = not single_runs  # capacity searches several systems
    p.add_argument("--hw", type=name_list if many else str, default="gh200-96g",
                   help="comma-separated systems or TOML files" if many else "system name or TOML file")
    p.add_argument("--model", default="opt-13b", help=MODEL_HELP)
    p.add_argument("--trace", default="sharegpt", help=TRACE_HELP)
    _trace_format_option(p)
    p.add_argument("--num-requests", type=RULES["num_requests"], default=500, help="requests to take (0: the whole trace)")
    p.add_argument("--rate", type=RULES["rate"], help="re-time arrivals as Poisson at this rate (req/s; inf: all at 0; "
                                             "default: the trace's own timestamps)")
    p.add_argument("--cv", type=RULES["cv"], help=CV_HELP + ("; shapes every probe's arrivals" if many else "; needs --rate")
                   + " (default 1)")
    policy_option(p)
    p.add_argument("--cpu-mem-gb", type=RULES["cpu_mem_gb"], help="CPU memory for KV (flexgen: for all it "
                   "offloads), GiB (default: 240 or the host's memory)")
    p.add_argument("--gpu-mem-util", type=RULES["gpu_mem_util"], default=0.9, help="share of HBM the engine may "
                   "use (weights, activations, KV pool)")
    add_engine_arguments(p)
    p.add_argument("--micro-batches", type=RULES["micro_batches"], help="pp-vllm, pipemax: micro-batches in the pipeline "
                                                              "(default: one per GPU of --hw)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallelism: GPUs of --hw's server that split "
                   "every layer as one engine (vllm, vllm-swap, static, pie, flexgen)")
    if single_runs:
        p.add_argument("--layer-events", action="store_true",
                       help="one SimPy event per layer and copy instead of the recurrence (slow; for checking)")
        p.add_argument("--trace-iterations", type=non_negative_int, default=3,
                       help="iterations to draw in timeline.json")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pie-sim", description="Pie's simulator of CPU-pooled LLM inference.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("preview", help="closed-form cost-model preview of CPU pooling per system")
    p.add_argument("--hw", type=name_list, default=DEFAULT_HW, help="comma-separated systems or TOML files "
                                                                    f"(default {DEFAULT_HW})")
    p.add_argument("--model", type=name_list, default="opt-13b,opt-30b", help="comma-separated models (names, TOML "
                   "files, Hugging Face config.json files or model folders)")
    p.add_argument("--trace", default="sharegpt", help=TRACE_HELP + "; sets the mean context")
    _trace_format_option(p)
    p.add_argument("--gpu-mem-util", type=fraction, default=0.9, help="share of HBM the engine may use")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="most sequences in one batch (vLLM's "
                                                                          "--max-num-seqs)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallelism: GPUs splitting every layer")
    p.add_argument("--out", default="out/preview", help="folder for preview.csv and preview.png")
    add_force_argument(p)
    p.set_defaults(run=cmd_preview)

    p = commands.add_parser("run", help="simulate one policy on a workload")
    _workload_options(p, lambda q: q.add_argument("--policy", default="pie", help=", ".join(names(backend=SIM))))
    add_metric_arguments(p)
    p.add_argument("--out", required=True, help="folder for the run's files")
    add_force_argument(p)
    p.set_defaults(run=cmd_run)

    p = commands.add_parser("compare", help="simulate several policies on the same requests")
    _workload_options(p, lambda q: q.add_argument("--policies", type=name_list, default=COMPARED,
                                                  help="comma-separated: " + ", ".join(names(backend=SIM))))
    add_metric_arguments(p)
    # The default is a KV-limited serving load: GH200 with half its HBM for the engine, where vLLM preempts.
    p.set_defaults(rate=20.0, gpu_mem_util=0.5, num_requests=600)
    p.add_argument("--out", default="out/compare", help="folder for compare.csv, runs.png and per-policy files")
    add_force_argument(p)
    p.set_defaults(run=cmd_compare)

    p = commands.add_parser("oracle", help="the best fixed CPU share by brute force, with pie beside it")
    _workload_options(p, lambda q: q.add_argument(
        "--fixed", default="static", choices=FIXED, help="whose share is swept: static, or pie-fixed (Pie's "
        "placement at a held share)"))
    p.set_defaults(rate=20.0, gpu_mem_util=0.5, num_requests=600)  # compare's default: a KV-limited load
    p.add_argument("--shares-from", type=RULES["share"], default=0.0, help="first share")
    p.add_argument("--shares-to", type=RULES["share"], help="last share (default: pie's largest, the link's bound)")
    p.add_argument("--shares-step", type=open_fraction, default=0.025, help="step")
    p.add_argument("--workers", type=positive_int, help="parallel runs (default: one per CPU core)")
    p.add_argument("--out", default="out/oracle", help="folder for oracle.csv and warmup.png")
    add_force_argument(p)
    p.set_defaults(run=cmd_oracle)

    p = commands.add_parser("capacity", help="highest sustainable request rate within SLOs, or least HBM for a rate")
    _workload_options(p, lambda q: q.add_argument("--policy", type=name_list, default="pie,vllm",
                                                  help="comma-separated policies"), single_runs=False)
    # OPT-30B on the PCIe and GH200 systems: KV-limited at the rates they sustain.
    p.set_defaults(num_requests=2000, hw="gh200-96g,h100-sxm-pcie5,h200-sxm-pcie5", model="opt-30b")
    p.add_argument("--slo", action="append", metavar="METRIC_STAT=SECONDS",
                   help="an SLO, e.g. ttft_p99=2: a percentile pNN (0 < NN <= 100) or the mean of ttft, tpot, "
                        "itl, e2e or normalized (e2e / output tokens), at most SECONDS over the steady-state "
                        f"window; repeat for several; none: sustainable alone (default {' '.join(DEFAULT_SLOS)})")
    p.add_argument("--tolerance", type=open_fraction, default=0.02, help="relative bisection tolerance")
    p.add_argument("--confirm", type=positive_int, default=CONFIRM, help="judge the answer again with this many "
                   "times --num-requests, searching on with such runs where it misses (1: not)")
    p.add_argument("--min-hbm", action="store_true", help="search the least HBM (gpu_mem_util, up to "
                                                          "--gpu-mem-util) that sustains --rate within the SLOs")
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
