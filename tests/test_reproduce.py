"""`pie-sim reproduce` at toy size: every figure of the report traces back to runs anyone can repeat."""
import csv
import math

import pytest

from pie_sim import reproduce
from pie_sim.capacity import Answer
from pie_sim.cli import main
from pie_sim.reproduce import Grid, findings
from pie_sim.scenario import summarize

TOY = Grid(170, (0.1, 1.0), tolerance=0.3, slo_factors=(1.5, 5.0), static_shares=(0.3,))


@pytest.fixture(scope="module")
def toy(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setattr(reproduce, "QUICK", TOY)
    out = tmp_path_factory.mktemp("reproduce")
    assert main(["reproduce", "--quick", "--workers", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_every_panel_policy_and_rate_is_run_and_re_runs_alone_to_the_same_figures(toy):
    curves = rows(toy / "curves.csv")
    assert len(curves) == len(reproduce.MODELS) * len(reproduce.TRACES) * len(TOY.policies) * len(TOY.rate_factors)
    static = next(r for r in curves if r["policy"] == "static-0.3" and r["model"] == "opt-30b")
    again = summarize(reproduce.Scenario(hw="gh200-96g", model="opt-30b", trace=static["trace"], num_requests=170,
                                         gpu_mem_util=0.9, policy="static", share=0.3, rate=float(static["rate"])))
    assert float(static["throughput_tok_s"]) == pytest.approx(again["throughput_tok_s"], rel=1e-12)
    assert float(static["normalized_latency_s"]) == pytest.approx(again["normalized_latency_s"], rel=1e-12)


@pytest.mark.slow
def test_the_report_places_each_claim_beside_the_ratio_of_the_tables(toy):
    report = (toy / "report.md").read_text()
    offline = {(r["model"], r["trace"], r["policy"]): float(r["throughput_tok_s"]) for r in rows(toy / "offline.csv")}
    ratios = [offline[(m, t, "pie")] / offline[(m, t, "flexgen")] for m in reproduce.MODELS for t in reproduce.TRACES]
    flexgen_row = next(line for line in report.splitlines() if line.startswith("| Throughput, pie / FlexGen"))
    assert f"| {max(ratios):.2f}x |" in flexgen_row and "| 9.4x |" in flexgen_row
    searches = [r for r in rows(toy / "searches.csv") if r["search"] == "max_rate_req_s"]
    for m in reproduce.MODELS:
        for t in reproduce.TRACES:
            panel = sorted((float(r["slo_s"]), r["policy"], float(r["value"] or "nan")) for r in searches
                           if (r["model"], r["trace"]) == (m, t))
            assert len(panel) == 2 * len(TOY.slo_factors)  # vllm and pie at every SLO, tight first
            for factor, ((slo, _, pie), (same, _, vllm)) in zip(TOY.slo_factors, zip(panel[::2], panel[1::2])):
                row = next(line for line in report.splitlines() if line.startswith(f"| Throughput at equal "
                                                                                    f"latency (SLO {factor:g}x)"))
                if slo == same and math.isfinite(pie) and math.isfinite(vllm):
                    assert f"{pie / vllm:.2f}x" in row
    assert "## Why the simulator finds what it finds" in report and (toy / "latency_vs_rate.png").stat().st_size > 0


def test_findings_are_ratios_of_the_panel_runs():
    answer = lambda value: Answer(value, "found", (), 10.0, "")  # noqa: E731
    summary = lambda tok, lat: dict(throughput_tok_s=tok, normalized_latency_s=lat)  # noqa: E731
    panel = reproduce.Panel("opt-13b", "sharegpt", reproduce.Scenario(), offline={
        "pie": summary(300.0, 1.0), "flexgen": summary(100.0, 5.0)},
        curves={"vllm": [summary(1, 0.02), summary(1, 0.08)], "pie": [summary(1, 0.02), summary(1, 0.04)]},
        max_rates=({"vllm": answer(4.0), "pie": answer(6.0)}, {"vllm": answer(5.0), "pie": answer(10.0)}),
        min_hbm={"vllm": answer(0.9), "pie": answer(0.6)})
    f = findings(panel)
    assert (f.throughput, f.latency, f.flexgen) == ((1.5, 2.0), 2.0, 3.0) and f.gpu_memory == pytest.approx(1.5)
