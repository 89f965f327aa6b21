"""Trace loaders, arrival processes and workload selection; bad input refused by file, line and problem."""
import csv
import json
from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from traces import BUILTIN, TraceError, gamma_arrivals, load_trace, load_workload, read_table
from traces.workload import DATA_DIR

from .conftest import REPO


@pytest.mark.parametrize("name, rows", [("sharegpt", 15454), ("alpaca", 52002), ("azure-conv", 19366),
                                        ("azure-code", 8819)])
def test_builtin_traces_load_whole(name, rows):
    table = load_trace(name)
    assert list(table.columns) == ["arrival_s", "prompt_tokens", "output_tokens"]
    assert len(table) == rows
    assert table.prompt_tokens.dtype == np.int64 and (table.prompt_tokens >= 1).all()
    assert (table.output_tokens >= 1).all()


def test_azure_keeps_its_real_timestamps():
    path = DATA_DIR / BUILTIN["azure-conv"].file
    with open(path) as f:
        rows = list(csv.DictReader(f))
    # Independent parse: seconds since the first row, microsecond precision from the first 26 characters.
    stamps = [datetime.strptime(r["TIMESTAMP"][:26], "%Y-%m-%d %H:%M:%S.%f") for r in rows]
    expected = np.array([(s - stamps[0]).total_seconds() for s in stamps])
    table = load_trace("azure-conv")
    np.testing.assert_allclose(table.arrival_s.to_numpy(), expected, atol=1e-6)
    assert table.prompt_tokens.iloc[0] == int(rows[0]["ContextTokens"])


def test_alpaca_is_fitted_to_the_published_means():
    table = load_trace("alpaca")
    assert table.prompt_tokens.mean() == pytest.approx(19.31, rel=0.01)
    assert table.output_tokens.mean() == pytest.approx(58.45, rel=0.01)
    assert "SYNTHETIC" in BUILTIN["alpaca"].description


def test_sharegpt_respects_vllm_filter():
    table = load_trace("sharegpt")
    assert table.prompt_tokens.min() >= 4 and table.output_tokens.min() >= 4
    assert table.prompt_tokens.max() <= 1024
    assert (table.prompt_tokens + table.output_tokens).max() <= 2048


def test_azure_attribution_ships_with_the_data():
    folder = DATA_DIR / "azure_llm_2023"
    assert "Attribution 4.0 International" in (folder / "LICENSE").read_text(encoding="utf-8-sig")
    assert "Splitwise" in (folder / "README.md").read_text()
    assert "Splitwise" in (REPO / "README.md").read_text()


GOOD_CSV = "arrival_s,prompt_tokens,output_tokens\n0.0,10,5\n0.5,20,7\n1.5,30,9\n"


@pytest.mark.parametrize("name, text, message", [
    ("a.csv", "arrival_s,prompt_tokens\n0,10\n", "missing column 'output_tokens'"),
    ("a.csv", "arrival_s,prompt_tokens,output_tokens\n0,10,5\n1,-3,5\n", "line 3: prompt_tokens = '-3' must be at least 1 token"),
    ("a.csv", "arrival_s,prompt_tokens,output_tokens\n0,10,5\n1,10,2.5\n", "line 3: output_tokens = '2.5' is not a whole number"),
    ("a.csv", "arrival_s,prompt_tokens,output_tokens\n0,10,abc\n", "line 2: output_tokens = 'abc' is not a number"),
    ("a.csv", "arrival_s,prompt_tokens,output_tokens\n0,10,5\n2,10,5\n\n1,10,5\n", "line 5: arrival goes back in time (before line 3)"),
    ("a.csv", "arrival_s,prompt_tokens,output_tokens\n-1,10,5\n", "line 2: arrival_s = '-1' is negative"),
    ("a.csv", "arrival_s,prompt_tokens,output_tokens\n0,10\n", "line 2: 2 fields, the header has 3"),
    ("a.csv", "", "no requests in the file"),
    ("a.csv", "arrival_s,prompt_tokens,output_tokens\n", "no requests in the file"),
    ("a.jsonl", '{"prompt_tokens": 3, "output_tokens": 4}\n{"prompt_tokens": 3\n', "line 2: not valid JSON"),
    ("a.jsonl", '{"prompt_tokens": 3, "output_tokens": 4}\n\n{"prompt_tokens": 3}\n', "line 3: missing field 'output_tokens'"),
    ("a.jsonl", '[1, 2]\n', "line 1: expected a JSON object"),
    ("a.jsonl", '{"prompt_tokens": 0, "output_tokens": 4}\n', "line 1: prompt_tokens = 0 must be at least 1"),
    ("a.txt", "x", "unknown format '.txt'"),
    ("azure.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n"
                  "2023-11-16 18:15:45.00,396,109\n", "line 3: arrival goes back in time"),
    ("azure.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,374,44\n", "line 2: TIMESTAMP = 'yesterday' is not a date"),
])
def test_bad_input_is_refused_with_file_line_and_problem(write, name, text, message):
    path = write(name, text)
    with pytest.raises(TraceError) as info:
        read_table(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value), str(info.value)


def test_missing_file_and_unknown_trace():
    with pytest.raises(TraceError, match="no such file"):
        load_trace("/nonexistent/trace.csv")
    with pytest.raises(TraceError, match="unknown trace 'sharegtp'.*sharegpt, alpaca, azure-conv, azure-code"):
        load_trace("sharegtp")


def test_user_csv_and_jsonl_read_the_same(write):
    from_csv = read_table(write("t.csv", GOOD_CSV))
    rows = [dict(arrival_s=a, prompt_tokens=p, output_tokens=o) for a, p, o in [(0.0, 10, 5), (0.5, 20, 7), (1.5, 30, 9)]]
    from_jsonl = read_table(write("t.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    pd.testing.assert_frame_equal(from_csv, from_jsonl)
    assert from_csv.arrival_s.tolist() == [0.0, 0.5, 1.5]


def test_file_without_arrivals_arrives_at_zero(write):
    table = read_table(write("t.csv", "prompt_tokens,output_tokens\n3,4\n5,6\n"))
    assert table.arrival_s.tolist() == [0.0, 0.0]


def test_poisson_arrivals_have_the_requested_rate_and_are_seeded():
    times = gamma_arrivals(20000, rate=4.0, cv=1.0, rng=np.random.default_rng(1))
    gaps = np.diff(times)
    assert times[0] == 0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    again = gamma_arrivals(20000, rate=4.0, cv=1.0, rng=np.random.default_rng(1))
    assert np.array_equal(times, again)


def test_gamma_arrivals_have_the_requested_burstiness():
    gaps = np.diff(gamma_arrivals(40000, rate=2.0, cv=3.0, rng=np.random.default_rng(2)))
    assert gaps.mean() == pytest.approx(0.5, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)


def test_infinite_rate_sends_everything_at_once_and_bad_rates_are_refused():
    assert not gamma_arrivals(5, float("inf"), 1.0, np.random.default_rng(0)).any()
    with pytest.raises(ValueError, match="rate must be positive"):
        gamma_arrivals(5, 0.0, 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="coefficient of variation"):
        gamma_arrivals(5, 1.0, -1.0, np.random.default_rng(0))


def test_workload_takes_the_head_of_a_timestamped_trace():
    whole = load_trace("azure-code")
    work = load_workload("azure-code", 100)
    assert work.request_id.tolist() == list(range(100))
    assert work.prompt_tokens.tolist() == whole.prompt_tokens.iloc[:100].tolist()
    np.testing.assert_allclose(work.arrival_s, whole.arrival_s.iloc[:100] - whole.arrival_s.iloc[0])


def test_workload_filters_then_samples_and_is_deterministic():
    a = load_workload("sharegpt", 500, rate=8.0, seed=3, max_prompt_tokens=100, max_total_tokens=400)
    b = load_workload("sharegpt", 500, rate=8.0, seed=3, max_prompt_tokens=100, max_total_tokens=400)
    c = load_workload("sharegpt", 500, rate=8.0, seed=4, max_prompt_tokens=100, max_total_tokens=400)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    assert (a.prompt_tokens <= 100).all() and ((a.prompt_tokens + a.output_tokens) <= 400).all()
    assert a.arrival_s.is_monotonic_increasing and a.arrival_s.iloc[-1] == pytest.approx(500 / 8.0, rel=0.15)


def test_workload_refuses_more_requests_than_the_trace_has(write):
    path = write("t.csv", GOOD_CSV)
    assert len(load_workload(path)) == 3
    with pytest.raises(TraceError, match="has 2 requests within the length limits; cannot take 3"):
        load_workload(path, 3, max_prompt_tokens=20)
