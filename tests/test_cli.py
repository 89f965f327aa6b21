"""The command lines: the default job writes its table and plot; bad names fail with the known ones listed."""
import csv
import json

from pie_exec.cli import main as pie_exec
from pie_sim.cli import main as pie_sim


def test_preview_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "preview"
    assert pie_sim(["preview", "--hw", "gh200-96g,h100-sxm-pcie5", "--model", "opt-30b", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gh200-96g" in printed and "h100-sxm-pcie5" in printed
    with open(out / "preview.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["hw"] for r in rows] == ["gh200-96g", "h100-sxm-pcie5"]
    # The faster link hides a larger CPU share, and pooling never loses to GPU-only.
    assert float(rows[0]["best_cpu_share"]) > float(rows[1]["best_cpu_share"])
    assert all(float(r["gain"]) >= 1.0 for r in rows)
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preview_reports_models_that_do_not_fit(tmp_path, capsys):
    assert pie_sim(["preview", "--hw", "a100-80g-sxm-pcie4,gh200-144g", "--model", "opt-66b", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "skipped:" in printed and "opt-66b on a100-80g-sxm-pcie4 leaves no KV pool" in printed
    with open(tmp_path / "preview.csv") as f:
        assert [r["hw"] for r in csv.DictReader(f)] == ["gh200-144g"]


def test_unknown_names_fail_listing_the_known_ones(tmp_path, capsys):
    assert pie_sim(["preview", "--hw", "gh300", "--out", str(tmp_path)]) == 2
    assert "unknown hardware 'gh300'" in capsys.readouterr().out
    assert pie_sim(["preview", "--trace", "sharegtp", "--out", str(tmp_path)]) == 2
    assert "known: sharegpt" in capsys.readouterr().out


def test_pie_exec_env_names_a_catalog_entry(capsys):
    assert pie_exec(["env"]) == 0
    printed = capsys.readouterr().out
    assert "torch" in printed and "simulate with:" in printed


def test_run_writes_every_file_and_is_deterministic(tmp_path, capsys):
    args = ["run", "--policy", "pie", "--model", "opt-30b", "--num-requests", "60", "--rate", "inf",
            "--gpu-mem-util", "0.75"]
    assert pie_sim(args + ["--out", str(tmp_path / "a")]) == 0
    assert pie_sim(args + ["--out", str(tmp_path / "b")]) == 0
    for name in ("requests.csv", "iterations.csv", "timeline.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab"]
    for s in summaries:
        s.pop("wall_s")  # the only field that may differ: it is measured, not simulated
    assert summaries[0] == summaries[1] and summaries[0]["finished"] == 60
    trace = json.loads((tmp_path / "a" / "timeline.json").read_text())["traceEvents"]
    assert any(e.get("tid") == 2 and e["ph"] == "X" for e in trace), "the traced iterations show copies"
    assert (tmp_path / "a" / "runs.png").read_bytes()[:4] == b"\x89PNG"
    assert "pie" in capsys.readouterr().out


def test_compare_runs_each_policy_on_the_same_requests(tmp_path, capsys):
    assert pie_sim(["compare", "--policies", "vllm,pie", "--num-requests", "40", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["policy"] for r in rows] == ["vllm", "pie"] and all(r["finished"] == "40" for r in rows)
    assert (tmp_path / "vllm" / "requests.csv").exists() and (tmp_path / "pie" / "iterations.csv").exists()
    printed = capsys.readouterr().out
    assert "preempt." in printed and "(gpu_mem_util 0.5)" in printed  # the figure this load is about
    assert pie_sim(["compare", "--policies", "vllm,pi", "--out", str(tmp_path)]) == 2
    assert "unknown policy 'pi'" in capsys.readouterr().out


def test_compare_runs_the_pipeline_policies_on_the_multi_gpu_server(tmp_path, capsys):
    args = ["compare", "--hw", "pcie-8x-l40s", "--model", "opt-6.7b", "--trace", "alpaca", "--num-requests", "30",
            "--rate", "inf", "--gpu-mem-util", "0.045"]
    assert pie_sim(args + ["--policies", "pp-vllm,pipemax", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["policy"] for r in rows] == ["pp-vllm", "pipemax"]
    assert all(int(r["finished"]) + int(r["rejected"]) == 30 for r in rows)
    assert pie_sim(args + ["--policies", "pipemax", "--micro-batches", "7", "--out", str(tmp_path), "--force"]) == 2
    assert "7 micro-batches cannot fill 8 pipeline stages" in capsys.readouterr().out


def test_errors_print_names_with_brackets_as_they_are(tmp_path, capsys):
    """A user's error is printed as text, not as terminal markup: square brackets in a path survive."""
    trace = tmp_path / "neg[run1].csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0,-5,3\n")
    assert pie_sim(["run", "--trace", str(trace), "--num-requests", "1", "--out", str(tmp_path / "o")]) == 2
    assert "neg[run1].csv" in capsys.readouterr().out.replace("\n", "")


def test_flexgen_is_sized_from_the_requests_that_fit_the_model(tmp_path):
    """azure-code's mean prompt (about 2,000 tokens) leaves OPT-13B's 2,048-token context no room for the
    mean output: FlexGen's block is sized for the requests the model can serve, the others are rejected."""
    out = tmp_path / "o"
    assert pie_sim(["run", "--policy", "flexgen", "--trace", "azure-code", "--num-requests", "40", "--out",
                    str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    too_long = [r for r in rows if int(r["prompt_tokens"]) + int(r["output_tokens"]) - 1 > 2048]
    assert too_long and summary["rejected"] == len(too_long) and summary["finished"] == 40 - len(too_long)
