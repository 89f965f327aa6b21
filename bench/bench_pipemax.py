"""PipeMax vs plain pipeline parallelism: simulated offline throughput on the 8-GPU PCIe server,
and where PipeMax's gain comes from and where it ends (link bandwidth, CPU memory, micro-batches, batch cap,
the model's KV size). Prints the markdown tables of bench/RESULTS.md.

    nice -n 19 python3 bench/bench_pipemax.py [--num-requests 800] [--workers 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from hwmodels import CapacityError, CostModel, GiB, load_hardware, load_model
from hwmodels.hardware import HARDWARE_DIR
from pie_sim.parallel import run_parallel
from pie_sim.scenario import Scenario, simulate_scenario
from pie_sim.simulate import SimResult

HW = "pcie-8x-l40s"
LINK_FIELDS = ("h2d_gb_s", "d2h_gb_s", "bidirectional_gb_s", "switch_uplink_gb_s")


def scaled_links(factor: float, folder: Path) -> str:
    """The server's TOML with every PCIe figure (GPU links, both ways, switch uplinks) times `factor`."""
    lines = []
    for line in (HARDWARE_DIR / f"{HW}.toml").read_text().splitlines():
        key = line.split("=")[0].strip()
        if key in LINK_FIELDS:
            line = f"{key} = {float(line.split('=')[1].split('#')[0]) * factor:g}"
        lines.append(line)
    path = folder / f"{HW}-links-x{factor:g}.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def first_half_throughput(result: SimResult) -> float:
    """Output tokens a second until half of them are out: the loaded phase, without the drain (the last,
    longest requests decoding one token a pipeline pass) that takes about half of an offline run."""
    rows = result.recorder.iterations
    order = np.argsort(rows["end_s"])
    tokens = np.cumsum(rows["batch_sequences"][order])  # one token a sequence a plan (no chunked prefill)
    half = np.searchsorted(tokens, tokens[-1] / 2)
    return float(tokens[half] / rows["end_s"][order][half])


def point(scenario: Scenario) -> dict:
    started = time.perf_counter()
    summary, result = simulate_scenario(scenario)
    summary["first_half_tok_s"] = first_half_throughput(result)
    summary["bench_wall_s"] = time.perf_counter() - started
    return summary


def table(title: str, label: str, rows: list[tuple[str, dict, dict]]) -> str:
    """One markdown table: per row, pp-vllm and pipemax side by side."""
    out = [f"**{title}**", "",
           f"| {label} | pp-vllm tok/s | pipemax tok/s | gain | gain, first half | pipemax H2D GiB | peak CPU KV GiB | "
           f"stall s | tokens/plan (pp, pm) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, pp, pm in rows:
        per_plan = [s["throughput_tok_s"] * s["run_s"] / s["iterations"] for s in (pp, pm)]
        out.append(f"| {name} | {pp['throughput_tok_s']:,.0f} | {pm['throughput_tok_s']:,.0f} | "
                   f"{pm['throughput_tok_s'] / pp['throughput_tok_s']:.2f}x | "
                   f"{pm['first_half_tok_s'] / pp['first_half_tok_s']:.2f}x | {pm['total_bytes_h2d'] / GiB:,.0f} | "
                   f"{pm['peak_cpu_kv_bytes'] / GiB:.1f} | {pm['total_stall_s']:.1f} | {per_plan[0]:.1f}, {per_plan[1]:.1f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=800)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    base = Scenario(hw=HW, model="opt-66b", trace="sharegpt", num_requests=args.num_requests, rate=float("inf"))
    folder = Path(tempfile.mkdtemp(prefix="pipemax-"))
    sweeps = {
        "model": [(name, base.replace(model=name)) for name in ("opt-66b", "llama-2-70b")],
        "links": [(f"x{f:g} ({25 * f:g} GB/s a link)", base.replace(hw=scaled_links(f, folder)))
                  for f in (0.5, 1, 2, 4, 8)],
        "cpu": [(f"{gb:g} GiB", base.replace(cpu_mem_gb=gb)) for gb in (0, 2, 8, 32, 240)],
        "micro": [(str(m), base.replace(micro_batches=m)) for m in (8, 9, 12, 16)],
        "seqs": [(str(n), base.replace(max_num_seqs=n)) for n in (16, 32, 64, 256)],
    }
    jobs = [(sweep, label, s.replace(policy=policy)) for sweep, points in sweeps.items() for label, s in points
            for policy in ("pp-vllm", "pipemax")]
    small = base.replace(model="opt-13b")
    jobs += [("replicas", "opt-13b", small.replace(policy=p)) for p in ("pp-vllm", "pipemax")]
    jobs.append(("replicas", "opt-13b", small.replace(policy="vllm", num_requests=args.num_requests // 8)))
    started = time.perf_counter()
    summaries = run_parallel(point, [s for _, _, s in jobs], Console(stderr=True), "pipemax bench", args.workers)
    wall = time.perf_counter() - started
    results: dict = {}
    for (sweep, label, s), summary in zip(jobs, summaries):
        results.setdefault(sweep, {}).setdefault(label, {})[s.policy] = summary

    def rows(sweep):
        return [(label, r["pp-vllm"], r["pipemax"]) for label, r in results[sweep].items()]

    try:
        CostModel(load_hardware(HW), load_model("opt-66b")).memory_budget(base.gpu_mem_util)
        single = "fits"
    except CapacityError as e:
        single = f"refused ({e})"
    replicas = results["replicas"]["opt-13b"]
    print(f"{args.num_requests} ShareGPT requests, offline (all at t=0), {HW}, defaults unless the row says "
          f"(gpu_mem_util 0.9, 240 GiB CPU memory, 8 micro-batches, 256 sequences an engine).")
    print(f"Single GPU: OPT-66B on one L40S is {single}. OPT-13B fits one: 8 data-parallel vllm replicas, "
          f"each serving {args.num_requests // 8} of the requests: {8 * replicas['vllm']['throughput_tok_s']:,.0f} "
          f"tok/s (8 x one replica) against pp-vllm {replicas['pp-vllm']['throughput_tok_s']:,.0f} and pipemax "
          f"{replicas['pipemax']['throughput_tok_s']:,.0f} over the 8 GPUs.\n")
    print(table("Model (KV per token per stage: OPT-66B 295 KB, Llama-2-70B 41 KB)", "model", rows("model")), "\n")
    print(table("PCIe bandwidth (links, both ways, and switch uplinks scaled; host memory 300 GB/s)", "links",
                rows("links")), "\n")
    print(table("CPU memory for streamed KV", "CPU memory", rows("cpu")), "\n")
    print(table("Micro-batches (engines)", "micro-batches", rows("micro")), "\n")
    print(table("Sequences an engine may run (max_num_seqs)", "max_num_seqs", rows("seqs")), "\n")
    slowest = max(summaries, key=lambda s: s["bench_wall_s"])
    print(f"{len(jobs)} runs in {wall:.0f} s with {args.workers} workers; slowest run {slowest['bench_wall_s']:.1f} s "
          f"({slowest['policy']}, {slowest['model']}, {slowest['hw']}); "
          f"{args.num_requests * len(jobs) / sum(s['bench_wall_s'] for s in summaries):.0f} requests simulated per "
          f"wall-second of one worker.")


if __name__ == "__main__":
    main()
