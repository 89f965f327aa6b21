"""`pie-exec validate`: the executor measures, the simulator predicts, on the same requests.

For each policy: the executor serves the prompts for real (arrivals at their times); then the simulator
serves requests of the same lengths and arrival times with the same engine (pools, block size, limits:
one `engine_config`) on the hardware profile `pie-exec calibrate` wrote. The report puts measured and
predicted side by side with the relative error (predicted / measured - 1) of throughput, TTFT, TPOT, e2e
latency, iteration time and bytes moved. The plot prices each measured iteration's own plan on the
profile (`Timeline` replaying the executed plans at their measured starts): the per-iteration view of
the same error; the next rows split those iterations' time into the layers' compute, their stalls and
the rest, measured and priced, to say where the error comes from; the last give each policy's throughput
and mean latency against the first policy's, measured and predicted. This is the one module where the
two backends meet.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from hwmodels import CostModel, HardwareSpec, ModelSpec
from pie_policy.records import write_csv
from pie_policy.sizing import engine_config, make_policy, policy_share
from pie_sim.simulate import simulate
from pie_sim.timeline import Timeline

from .engine import Executor
from .run import Prompt, run

# summary key → label; iteration_mean_s is added from the iterations
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
    rows: list[tuple[str, float | None, float | None]]   # (metric, measured, predicted)
    measured_iterations: np.ndarray                       # seconds of each executed iteration
    replayed_iterations: np.ndarray                       # the profile's seconds for the same plans


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


def compare_policy(name: str, model, spec: ModelSpec, device, hw: HardwareSpec, prompts: list[Prompt],
                   kv_pool_bytes: int, cpu_mem_bytes: int, share: float | None, settings: dict,
                   progress: bool) -> Comparison:
    """Serve `prompts` with policy `name` on the executor, then in the simulator; both summaries compared."""
    share = policy_share(name, share)
    config = engine_config(spec, name, kv_pool_bytes, cpu_mem_bytes=cpu_mem_bytes, share=share, **settings)
    cost_model = CostModel(hw, spec)
    replay, measured_s, replayed_s = Timeline(cost_model), [], []
    measured_parts, replayed_parts = np.zeros(len(PLAN_PARTS)), np.zeros(len(PLAN_PARTS))

    def price(plan, stats):  # the profile's time for the plan just executed, started when it started
        nonlocal measured_parts, replayed_parts
        predicted = replay.run(plan, stats.start_s)
        measured_s.append(stats.end_s - stats.start_s)
        replayed_s.append(predicted.end_s - predicted.start_s)
        measured_parts, replayed_parts = measured_parts + parts(stats), replayed_parts + parts(predicted)

    policy = make_policy(name, config, share)
    executor = Executor(model, config, device, policy.staging_slots)
    try:
        requests, _, recorder, wall = run(executor, policy, prompts, progress=progress, on_iteration=price)
    finally:
        executor.close()
    measured = recorder.summary(requests, wall)
    simulated = simulate(make_policy(name, config, share), cost_model, workload_of(prompts))
    predicted = simulated.recorder.summary(simulated.requests, simulated.wall_s)
    for summary, its in ((measured, recorder.iterations), (predicted, simulated.recorder.iterations)):
        summary["iteration_mean_s"] = float(np.mean(its["end_s"] - its["start_s"]))
    rows = [(key, measured[key], predicted[key]) for key, _ in METRICS]
    rows += [(key, float(m), float(p)) for (key, _), m, p in zip(PLAN_PARTS, measured_parts, replayed_parts)]
    return Comparison(name, rows, np.array(measured_s), np.array(replayed_s))


def report(comparisons: list[Comparison], out: Path, console: Console) -> None:
    """Print the side-by-side table; write validate.csv and validate.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    view = Table(title="pie-exec validate: measured (executor) vs predicted (simulator); error = predicted / measured - 1")
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
    records = [(c.policy, key, m, p, relative_error(m, p)) for c, policy_rows in zip(comparisons, rows)
               for key, m, p in policy_rows]
    write_csv(out / "validate.csv", {name: np.array([r[i] for r in records], dtype=float if i > 1 else object)
                                     for i, name in enumerate(("policy", "metric", "measured", "predicted",
                                                               "relative_error"))})
    from pie_sim.plots import plot_iteration_check  # here: matplotlib takes half a second to import

    plot_iteration_check({c.policy: (c.measured_iterations, c.replayed_iterations) for c in comparisons},
                         out / "validate.png")


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"
