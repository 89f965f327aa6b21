"""`pie-validate`: the executor measures, the simulator predicts, on the same requests.

For each policy: the executor serves the prompts for real (arrivals at their times), once or in several
rounds that take the policies in turn; then the simulator serves requests of the same lengths and
arrival times with the same engine (pools, block size, limits: one `engine_config`) on the hardware
profile `pie-exec calibrate` wrote. The report puts measured (the rounds' median; the CSV has their
extremes) and predicted side by side with the relative error (predicted / measured - 1) of throughput,
TTFT, TPOT, e2e latency, iteration time and bytes moved. The plot prices each measured iteration's own
plan on the profile (`Timeline` replaying the executed plans from their measured starts, after the run):
the per-iteration view of the same error. The next rows split those iterations' time into the layers'
compute, their stalls and the rest, measured and priced, to say where the error comes from; the last
give each policy's throughput and mean latency against the first policy's, measured and predicted. This
package is the one place where the two backends meet.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from hwmodels import CostModel, HardwareSpec, ModelSpec
from pie_exec.engine import Executor
from pie_exec.run import Prompt, mean_context, run
from pie_policy import IterationStats, Policy
from pie_policy.sizing import engine_policy
from pie_serving.records import write_csv
from pie_sim.simulate import simulate
from pie_sim.timeline import Timeline

# summary key → label; iteration_mean_s is added from the iterations (`serve`)
METRICS = (("throughput_tok_s", "throughput tok/s"), ("ttft_mean_s", "TTFT mean s"), ("ttft_p50_s", "TTFT p50 s"),
           ("ttft_p99_s", "TTFT p99 s"), ("tpot_mean_s", "TPOT mean s"), ("tpot_p99_s", "TPOT p99 s"),
           ("e2e_mean_s", "e2e mean s"), ("e2e_p50_s", "e2e p50 s"), ("e2e_p99_s", "e2e p99 s"),
           ("iteration_mean_s", "iteration mean s"), ("total_bytes_h2d", "bytes h2d"),
           ("total_bytes_d2h", "bytes d2h"))
# Each policy against the first: what a policy study reads off, and what a machine that drifts alike
# under every policy leaves alone (a shared VM drifts by 5-10% between a calibration and a validation).
AGAINST_FIRST = (("throughput_tok_s", "throughput"), ("e2e_mean_s", "e2e mean"))
# Where the executed iterations' time goes, measured and priced on the same plans (the replay): the layers'
# compute, their stalls on copies, and the rest (embedding, LM head, batching, Python between layers).
PLAN_PARTS = (("plan_layers_s", "executed plans: layers s"), ("plan_stalls_s", "executed plans: stalls s"),
              ("plan_outside_s", "executed plans: outside layers s"))


def parts(stats) -> np.ndarray:
    """An iteration's seconds in layer compute, in stalls, and outside the layers (as PLAN_PARTS)."""
    layers, stalls = sum(stats.layer_compute_s), sum(stats.layer_stall_s)
    return np.array([layers, stalls, stats.end_s - stats.start_s - layers - stalls])


@dataclasses.dataclass
class Comparison:
    policy: str
    rows: list[tuple[str, float | None, float | None]]   # (metric, measured: the rounds' median, predicted)
    spread: dict[str, tuple[float, float]]                # metric → the rounds' lowest and highest measurement
    measured_iterations: np.ndarray                       # seconds of each executed iteration (first round)
    replayed_iterations: np.ndarray                       # the profile's seconds for the same plans


@dataclasses.dataclass
class Served:
    """One run of a policy on the executor: its summary (with `iteration_mean_s` and the PLAN_PARTS) and
    every executed plan with its stats."""
    summary: dict
    executed: list


def against_first(c: Comparison, first: Comparison) -> list[tuple[str, float | None, float | None]]:
    """`c`'s AGAINST_FIRST figures as ratios to the first policy's, measured and predicted."""
    mine, base = ({key: (m, p) for key, m, p in x.rows} for x in (c, first))
    return [(f"{key}_vs_first", *(a / b if a and b else None for a, b in zip(mine[key], base[key])))
            for key, _ in AGAINST_FIRST]


def relative_error(measured: float | None, predicted: float | None) -> float | None:
    if measured is None or predicted is None or measured == 0:
        return None
    return predicted / measured - 1


def workload_of(prompts: list[Prompt]) -> pd.DataFrame:
    """The simulator's view of the executor's requests: ids as the executor numbers them, lengths, times."""
    return pd.DataFrame({"request_id": range(len(prompts)), "arrival_s": [p.arrival_s for p in prompts],
                         "prompt_tokens": [len(p.token_ids) for p in prompts],
                         "output_tokens": [p.max_new_tokens for p in prompts]})


def policy_maker(name: str, cost_model: CostModel, prompts: list[Prompt], kv_pool_bytes: int, cpu_mem_bytes: int,
                 share: float | None, settings: dict) -> Callable[[], Policy]:
    """A maker of fresh copies of policy `name` as both backends build it (`sizing.engine_policy`, on the
    profile's link and compute figures): the one the executor runs and the simulator simulates."""
    return lambda: engine_policy(name, cost_model, kv_pool_bytes, context=mean_context(prompts),
                                 cpu_mem_bytes=cpu_mem_bytes, share=share, **settings)


def serve(make: Callable[[], Policy], model, device, prompts: list[Prompt], progress: bool) -> Served:
    """Serve `prompts` with a fresh policy from `make` on the executor."""
    policy, executed = make(), []
    executor = Executor(model, policy.config, device, policy.staging_slots)
    try:
        requests, _, recorder, wall = run(executor, policy, prompts, progress=progress,
                                          on_iteration=lambda plan, stats: executed.append((plan, stats)))
    finally:
        executor.close()
    summary = recorder.summary(requests, wall)
    summary["iteration_mean_s"] = float(np.mean([stats.end_s - stats.start_s for _, stats in executed]))
    summary.update(zip((key for key, _ in PLAN_PARTS), sum(parts(stats) for _, stats in executed)))
    return Served(summary, executed)


def replay(cost_model: CostModel, executed: list) -> list[IterationStats]:
    """The profile's stats for the executed plans (`Timeline`), each started when it started, or when the
    plan before it ends in the replay if that is later: started earlier, its copies would queue behind
    the last plan's on the links and show as stalls that neither backend has."""
    timeline, replayed, end = Timeline(cost_model), [], 0.0
    for plan, stats in executed:
        replayed.append(timeline.run(plan, max(stats.start_s, end)))
        end = replayed[-1].end_s
    return replayed


def compare(name: str, make: Callable[[], Policy], cost_model: CostModel, prompts: list[Prompt],
            rounds: list[Served]) -> Comparison:
    """The simulator on the same requests and engine, against the executor's rounds (their median)."""
    simulated = simulate(make(), cost_model, workload_of(prompts))
    predicted = simulated.recorder.summary(simulated.requests, simulated.wall_s)
    its = simulated.recorder.iterations
    predicted["iteration_mean_s"] = float(np.mean(its["end_s"] - its["start_s"]))
    replayed = [replay(cost_model, served.executed) for served in rounds]
    replayed_parts = np.median([sum(parts(stats) for stats in r) for r in replayed], axis=0)
    predicted.update(zip((key for key, _ in PLAN_PARTS), replayed_parts))
    rows, spread = [], {}
    for key, _ in METRICS + PLAN_PARTS:
        measured = [served.summary[key] for served in rounds]
        rows.append((key, float(np.median(measured)), float(predicted[key])))
        spread[key] = (float(min(measured)), float(max(measured)))
    first = rounds[0].executed
    return Comparison(name, rows, spread, np.array([stats.end_s - stats.start_s for _, stats in first]),
                      np.array([stats.end_s - stats.start_s for stats in replayed[0]]))


def validate(names: list[str], model, spec: ModelSpec, device, hw: HardwareSpec, prompts: list[Prompt],
             kv_pool_bytes: int, cpu_mem_bytes: int, share: float | None, settings: dict, rounds: int,
             progress: bool) -> list[Comparison]:
    """Every policy served `rounds` times on the executor, in turn (vllm, static, pie, vllm, ...), so that a
    machine whose speed drifts moves every policy's median alike; then each compared with the simulator."""
    cost_model = CostModel(hw, spec)
    makers = {name: policy_maker(name, cost_model, prompts, kv_pool_bytes, cpu_mem_bytes, share, settings)
              for name in names}
    served = [[serve(makers[name], model, device, prompts, progress) for name in names] for _ in range(rounds)]
    return [compare(name, makers[name], cost_model, prompts, [r[i] for r in served]) for i, name in enumerate(names)]


def report(comparisons: list[Comparison], out: Path, console: Console) -> None:
    """Print the side-by-side table; write validate.csv and validate.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    view = Table(title="pie-validate: measured (executor) vs predicted (simulator); error = predicted / measured - 1")
    view.add_column("metric")
    for c in comparisons:
        for header in ("measured", "predicted", "error"):
            view.add_column(f"{c.policy}\n{header}", justify="right")
    labels = dict(METRICS + PLAN_PARTS)
    labels.update((f"{key}_vs_first", f"{name} / {comparisons[0].policy}'s") for key, name in AGAINST_FIRST)
    rows = [c.rows + against_first(c, comparisons[0]) for c in comparisons]
    for i, (key, _, _) in enumerate(rows[0]):
        cells = []
        for policy_rows in rows:
            _, m, p = policy_rows[i]
            e = relative_error(m, p)
            cells += [_number(m), _number(p), "-" if e is None else f"{e:+.1%}"]
        view.add_row(labels[key], *cells)
    console.print(view, width=None if console.is_terminal else 40 + 33 * len(comparisons))  # a log: no wrapping
    records = [(c.policy, key, m, p, relative_error(m, p), *c.spread.get(key, (None, None)))
               for c, policy_rows in zip(comparisons, rows) for key, m, p in policy_rows]
    columns = ("policy", "metric", "measured", "predicted", "relative_error", "measured_min", "measured_max")
    write_csv(out / "validate.csv", {name: np.array([r[i] for r in records], dtype=float if i > 1 else object)
                                     for i, name in enumerate(columns)})
    from pie_sim.plots import (
        plot_iteration_check,  # here: matplotlib takes half a second to import
    )

    plot_iteration_check({c.policy: (c.measured_iterations, c.replayed_iterations) for c in comparisons},
                         out / "validate.png")


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"
