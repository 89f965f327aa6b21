"""`pie-sim reproduce`'s outputs: CSV tables of every run, the latency-vs-rate figure, and report.md placing
the Pie paper's claims beside what the simulator finds, with the facts that explain each difference."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from hwmodels import GiB, load_hardware

from .capacity_report import write_rows
from .reproduce import PAPER_GPU_MEM_UTIL, SEARCHED, Findings, Grid, Panel, facts, findings, label


def claims_of(grid: Grid) -> list[tuple[str, str, Callable[[Findings], float | None]]]:
    """(claim, published figure, the panel's simulated figure from its Findings), one throughput row per SLO."""
    throughput = [(f"Throughput at equal latency (SLO {factor:g}x), pie / vLLM", "up to 1.9x",
                   lambda f, i=i: f.throughput[i]) for i, factor in enumerate(grid.slo_factors)]
    return throughput + [("Normalized latency at equal rate, vLLM / pie", "up to 2x", lambda f: f.latency),
                         ("GPU memory at equal performance, vLLM / pie", "up to 1.67x", lambda f: f.gpu_memory),
                         ("Throughput, pie / FlexGen", "9.4x", lambda f: f.flexgen)]


def write_tables(panels: list[Panel], out: Path) -> None:
    """offline.csv, curves.csv (every run: panel, policy, rate and its summary) and searches.csv."""
    keys = ("model", "trace", "policy")
    write_rows(out / "offline.csv", [_row(p, name, s) for p in panels for name, s in p.offline.items()])
    write_rows(out / "curves.csv", [_row(p, name, s) for p in panels for name, runs in p.curves.items()
                                    for s in runs])
    rows = []
    for p in panels:
        searches = [("max_rate_req_s", slo, rates) for slo, rates in zip(p.slos, p.max_rates)]
        for kind, slo, answers in searches + [("min_gpu_mem_util", p.slo, p.min_hbm or {})]:
            for name, a in answers.items():
                rows.append(dict(zip(keys, (p.model, p.trace, name)), slo_s=slo, search=kind, value=a.value,
                                 upper=a.upper, bound=a.bound, binding=a.binding, probes=len(a.probes)))
    write_rows(out / "searches.csv", rows)


def _row(p: Panel, name: str, summary: dict) -> dict:
    """A run's summary led by its panel and policy label (static's carries its share)."""
    return dict(model=p.model, trace=p.trace, policy=name) | {k: v for k, v in summary.items() if k != "policy"}


def plot_curves(panels: list[Panel], grid: Grid, path: Path) -> None:
    from .plots import log_seconds, plt, style  # matplotlib on demand

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, p in zip(axes.flat, panels):
        for i, (policy, share) in enumerate(grid.policies):
            name = label(policy, share)
            latency = [s["normalized_latency_s"] for s in p.curves[name]]
            (line,) = ax.plot(p.rates, latency, ms=5, mfc="none", label=name, **style(i, len(grid.policies)))
            beyond = [(r, y) for r, y, s in zip(p.rates, latency, p.curves[name]) if s["sustainable"] is False]
            if beyond:  # the rates it cannot sustain: a burst that drains, not a load it serves
                ax.plot(*zip(*beyond), "o", ms=9, mfc="none", color=line.get_color())
        for factor, slo, dashes in zip(grid.slo_factors, p.slos, (":", "-.")):
            ax.axhline(slo, color="k", lw=0.8, ls=dashes, label=f"SLO {factor:g}x")
        ax.set_yscale("log")
        log_seconds(ax.yaxis)
        ax.set_title(f"{p.name} (ringed: not sustainable)")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("normalized latency (s/token)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Normalized latency vs request rate on {panels[0].base.hw} "
                 f"(gpu_mem_util {panels[0].base.gpu_mem_util:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _num(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    return "all at once" if math.isinf(value) else fmt.format(value)


def _why(p: Panel, f: dict) -> str:
    """The facts behind one panel's figures, in a sentence or two."""
    where = (f"{p.name}: mean request {f['mean_context']} tokens; the KV pool ({f['kv_pool_gib']:.0f} GiB at "
             f"{p.base.gpu_mem_util:g} of HBM) holds about {f['kv_pool_sequences']:.0f} such sequences")
    if f["vllm_preemptions"] == 0:
        return (f"{where}, and vLLM never preempted even at the highest rate: KV capacity is not what limits "
                f"it, so pooling CPU memory has nothing to add (pie kept {f['pie_peak_cpu_kv_gib']:.1f} GiB in "
                f"CPU memory).")
    return (f"{where}; vLLM preempted {f['vllm_preemptions']} times at the highest rate, so it is KV-limited. "
            f"Pie pooled up to {f['pie_peak_cpu_kv_gib']:.1f} GiB in CPU memory, but the link lets it keep "
            f"only about {f['link_bound_share']:.0%} of the KV there without stalling compute, so it gains "
            f"at most about {1 / (1 - f['link_bound_share']):.2f}x the batch, and the batch only helps until "
            f"decode turns compute-bound.")


def write_report(panels: list[Panel], grid: Grid, quick: bool, path: Path,
                 sections: list[str] = ()) -> list[tuple[str, str, str, str]]:
    """report.md, with `sections` (Markdown lines) before the list of files; returns the claims table's rows
    (claim, published, simulated best, where)."""
    found = [findings(p) for p in panels]
    hw = load_hardware(panels[0].base.hw)
    claims = []
    for claim, published, figure in claims_of(grid):
        values = [(figure(f), p.name) for f, p in zip(found, panels) if figure(f) is not None]
        best = max(values, default=(None, "-"))
        claims.append((claim, published, _x(best[0]), best[1], [_x(figure(f)) for f in found]))
    lines = [f"# Pie's published claims beside the simulator ({'`pie-sim reproduce --quick`' if quick else '`pie-sim reproduce`'})",
             "",
             f"System `{hw.name}` ({hw.description}); OPT-13B and OPT-30B; ShareGPT and Alpaca (synthetic, the "
             f"published means); {grid.num_requests} requests per run, Poisson arrivals, seed "
             f"{panels[0].base.seed}, {PAPER_GPU_MEM_UTIL:g} of HBM for the engine. Rates: "
             f"{', '.join(f'{f:g}' for f in grid.rate_factors)} x vLLM's offline throughput per panel. SLOs: "
             f"{' and '.join(f'{f:g}' for f in grid.slo_factors)} x vLLM's normalized latency at the lightest "
             f"rate. Static at shares {', '.join(f'{s:g}' for s in grid.static_shares)}. Searches bisect to "
             f"{grid.tolerance:.0%}.",
             "",
             *([f"A smoke run: {grid.num_requests} requests rarely exhaust vLLM's KV pool, so pie and vLLM mostly "
                "coincide; `pie-sim reproduce` runs the grid that answers the claims.", ""] if quick else []),
             "| claim (Pie, arXiv 2411.09317) | published | simulated, best panel | panel | "
             + " | ".join(p.name for p in panels) + " |",
             "|---|---|---|---|" + "---|" * len(panels)]
    for claim, published, best, where, per in claims:
        lines.append(f"| {claim} | {published} | {best} | {where} | " + " | ".join(per) + " |")
    lines += ["", "Definitions: throughput at equal latency is the highest Poisson rate the policy *sustains* "
              "(over the steady-state window, warm-up and drain left out, it serves what arrives and its queue "
              "does not grow: `pie_sim/steady_state.py`) with its mean normalized latency over that window within "
              "the SLO (a tight one before the knee of the curves; in the full grid also a loose one past it); "
              "every such rate lies below the policy's offline throughput. Latency is the largest ratio over the "
              "rates of the curve (a burst above what a policy sustains drains, and its mean still counts here: "
              "the plot rings those points). GPU memory is the least HBM, up to "
              f"{PAPER_GPU_MEM_UTIL:g}, with which each policy sustains, within the tight SLO, the rate vLLM "
              f"sustains with {PAPER_GPU_MEM_UTIL:g} of HBM; FlexGen's throughput is offline (every request at "
              "once, its best case), as is pie's it is compared with.", "",
              "## Why the simulator finds what it finds", ""]
    lines += [f"- {_why(p, facts(p))}" for p in panels]
    lines += ["", GENERAL_REASONS, "", "## Per panel", "",
              "| panel | " + " | ".join(f"SLO {f:g}x s/token | max rate vllm | max rate pie" for f in grid.slo_factors)
              + " | least HBM vllm GiB | least HBM pie GiB | offline tok/s vllm | pie | flexgen |",
              "|---|" + "---:|" * (3 * len(grid.slo_factors) + 5)]
    for p in panels:
        hbm = {n: (p.min_hbm[n].value * hw.gpu.hbm_bytes / GiB if p.min_hbm and p.min_hbm[n].value else None)
               for n in SEARCHED}
        searched = "".join(f"{slo:.4f} | {_num(rates['vllm'].value, '{:.2f}')} | {_num(rates['pie'].value, '{:.2f}')} | "
                           for slo, rates in zip(p.slos, p.max_rates))
        lines.append(f"| {p.name} | {searched}{_num(hbm['vllm'], '{:.1f}')} | "
                     f"{_num(hbm['pie'], '{:.1f}')} | " + " | ".join(
                         f"{p.offline[n]['throughput_tok_s']:,.0f}" for n in ("vllm", "pie", "flexgen")) + " |")
    lines += ["", *sections, "", "Files: `offline.csv`, `curves.csv` (every run's summary), `searches.csv` (every search's "
              "answer), `latency_vs_rate.png`. Any point re-runs alone with `pie-sim run` and the same options."]
    path.write_text("\n".join(lines) + "\n")
    return [c[:4] for c in claims]


GENERAL_REASONS = """Across panels:
- Pie can only help where vLLM runs out of KV cache: where the KV pool holds more sequences than the rates
  vLLM can compute keep in flight, the two are the same system (the panels above say which).
- The share of the KV that may live in CPU memory without stalling compute is bounded by the link, about
  (link bandwidth / HBM bandwidth) x (1 + weights / KV bytes read per layer) (`pie-sim preview`), so
  pooling buys at most 1 / (1 - share) the KV capacity, and more KV helps only until decode turns
  compute-bound. Larger gains need a baseline more starved of KV than these settings make it.
- The simulator's vLLM is ideal: no scheduler or Python overhead, and preemption by recompute costs only
  the recomputation. Whatever the real vLLM pays beyond that widens the real gap and is absent here.
- FlexGen is the LP's best block for the mean request (`pie_policy/flexgen_lp.py`), each block run to its
  longest request; its ratio depends on how far the requests' lengths spread around that mean."""
