"""benchmark.json (vLLM benchmark_serving's keys) against the run's own requests.csv, SLO parsing, strict JSON."""
import json

import numpy as np
import pandas as pd
import pytest

from pie_serving.slo import Slo, SloError, parse_percentiles, parse_slo, parse_slos
from pie_sim.cli import main as pie_sim

VLLM_KEYS = ("duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
             "request_goodput", "output_throughput", "total_token_throughput")


def strict(path):
    """The file parsed as strict JSON: NaN, Infinity and -Infinity are refused."""
    def refuse(token):
        raise AssertionError(f"{path.name}: {token} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert pie_sim(["run", "--policy", "vllm", "--model", "opt-13b", "--num-requests", "200", "--rate", "30",
                    "--gpu-mem-util", "0.4", "--percentiles", "50,90,99.9", "--slo", "ttft_p99=0.5",
                    "--slo", "tpot_p50=0.03", "--slo", "itl_p99=0.1", "--out", str(out)]) == 0
    return out, strict(out / "benchmark.json"), pd.read_csv(out / "requests.csv")


def test_benchmark_json_has_vllms_keys_and_the_chosen_percentiles(run):
    _, bench, _ = run
    expected = set(VLLM_KEYS) | {f"{stat}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el")
                                 for stat in ("mean", "median", "std", "p50", "p90", "p99.9")}
    assert expected <= set(bench) and bench["backend"] == "pie-sim" and bench["request_rate"] == 30
    assert not {k for k in bench if k.startswith("p99_")}, "only the percentiles asked for"


def test_benchmark_figures_are_the_requests_figures(run):
    """Recomputed from requests.csv as vLLM's calculate_metrics computes them from its outputs."""
    _, bench, requests = run
    done = requests[requests.status == "finished"]
    duration = done.finish_s.max() - requests.arrival_s.min()
    assert bench["duration"] == pytest.approx(duration) and bench["completed"] == len(done)
    assert bench["request_throughput"] == pytest.approx(len(done) / duration)
    assert bench["output_throughput"] == pytest.approx(done.output_tokens.sum() / duration)
    assert bench["total_token_throughput"] == pytest.approx((done.prompt_tokens + done.output_tokens).sum() / duration)
    tpot = done.tpot_s[done.output_tokens > 1]
    for key, values in (("ttft", done.ttft_s), ("tpot", tpot), ("e2el", done.e2e_s)):
        assert bench[f"mean_{key}_ms"] == pytest.approx(values.mean() * 1000)
        assert bench[f"median_{key}_ms"] == pytest.approx(np.median(values) * 1000)
        assert bench[f"std_{key}_ms"] == pytest.approx(np.std(values) * 1000)
        assert bench[f"p99.9_{key}_ms"] == pytest.approx(np.percentile(values, 99.9) * 1000)
    good = (done.ttft_s <= 0.5) & (done.tpot_s.fillna(0) <= 0.03)  # vLLM: a one-token request's tpot is 0
    assert bench["request_goodput"] == pytest.approx(good.sum() / duration) and 0 < good.sum() < len(done)


def test_itl_adds_up_to_each_requests_time_after_its_first_token(run):
    """The gaps of a request sum to its last token's time minus its first's, one gap per token after the
    first: the mean ITL over all tokens follows from requests.csv alone."""
    _, bench, requests = run
    done = requests[requests.status == "finished"]
    mean = (done.finish_s - done.first_token_s).sum() / (done.output_tokens - 1).sum()
    assert bench["mean_itl_ms"] == pytest.approx(mean * 1000, rel=1e-9)
    assert bench["median_itl_ms"] <= bench["p90_itl_ms"] <= bench["p99.9_itl_ms"]


def test_json_is_strict_and_an_infinite_rate_is_spelt_as_vllm_spells_it(tmp_path):
    assert pie_sim(["run", "--policy", "vllm", "--model", "opt-1.3b", "--num-requests", "20", "--rate", "inf",
                    "--out", str(tmp_path)]) == 0
    summary, bench = strict(tmp_path / "summary.json"), strict(tmp_path / "benchmark.json")
    assert summary["rate"] is None and bench["request_rate"] == "inf" and bench["request_goodput"] is None


@pytest.mark.parametrize("args, message", [
    (["--percentiles", "50,101"], "--percentiles 50,101: percentile 101 is outside (0, 100]"),
    (["--percentiles", "p99"], "--percentiles p99: 'p99' is not a number"),
    (["--slo", "latency_p99=2"], "--slo latency_p99=2: unknown metric 'latency'"),
    (["--slo", "ttft_p99=abc"], "target 'abc' is not a number of seconds"),
])
def test_bad_metric_options_are_one_line_and_write_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert pie_sim(["run", "--num-requests", "10", *args, "--out", str(out)]) == 2
    printed = capsys.readouterr().out
    assert message in printed and len(printed.strip().splitlines()) == 1 and not out.exists()


def test_slos_parse_as_users_write_them():
    assert parse_slo("ttft_p99=2") == Slo("ttft", 99.0, 2.0)
    assert parse_slo("normalized_mean=0.2") == Slo("normalized", None, 0.2)
    assert parse_slo("tpot_p99.9=0.1").name == "tpot_p99.9" and str(parse_slo("e2e_p100=30")) == "e2e_p100=30"
    assert parse_percentiles("25,50,99.5") == (25.0, 50.0, 99.5)
    for bad in ("ttft=2", "ttft_p99", "_p99=2", "ttft_pinf=2", "ttft_pnan=2", "ttft_p99=inf", "ttft_p99=nan"):
        with pytest.raises(SloError):
            parse_slo(bad)
    with pytest.raises(SloError, match="given more than once"):
        parse_slos(["ttft_p99=2", "ttft_p99=1"])
