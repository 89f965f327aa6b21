"""`pie-sim sweep`: grids expand and are checked before anything runs; every row is the run `pie-sim run`
makes; an interrupted or broken sweep resumes to the table of an uninterrupted one, whatever the workers."""
import math
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from hwmodels import CatalogError
from pie_policy import ConfigError
from pie_sim.cli import main as pie_sim
from pie_sim.scenario import Scenario, summarize
from pie_sim.sweep import MEASURED_COLUMNS, expand_grid, load_grid, point_id

from .conftest import REPO

# 8 points of about 0.1 s each.
SMALL_GRID = """model = "opt-1.3b"
trace = "azure-conv"
num_requests = 40
rate = 50
policy = ["vllm", "pie"]
seed = [0, 1, 2, 3]
"""
# Half the points cannot fit the model in 0.001 of the HBM.
FAILING_GRID = """model = "opt-125m"
num_requests = 30
rate = inf
policy = ["vllm", "pie"]
gpu_mem_util = [0.001, 0.5]
"""


def simulated(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(columns=list(MEASURED_COLUMNS))


def sweep(grid, out, *options) -> int:
    return pie_sim(["sweep", str(grid), "--out", str(out), *options])


def test_grid_is_the_product_of_its_axes_in_file_order():
    points = expand_grid({"model": "opt-125m", "policy": ["vllm", "pie"], "rate": [1, 2.5, math.inf]})
    assert [(s.policy, s.rate) for s in points] == [("vllm", 1.0), ("vllm", 2.5), ("vllm", math.inf),
                                                    ("pie", 1.0), ("pie", 2.5), ("pie", math.inf)]
    assert all(s.model == "opt-125m" and type(s.rate) is float for s in points)
    swapped = expand_grid({"rate": [1, 2.5], "policy": ["vllm", "pie"]})
    assert [(s.rate, s.policy) for s in swapped] == [(1.0, "vllm"), (1.0, "pie"), (2.5, "vllm"), (2.5, "pie")]
    assert expand_grid({}) == [Scenario()]


def test_a_point_is_named_by_all_its_options_defaults_included():
    spelt_out, = expand_grid({"rate": 5, "seed": 0, "hw": "gh200-96g"})
    assert point_id(spelt_out) == point_id(Scenario(rate=5.0))
    assert len({point_id(Scenario(rate=5.0, seed=seed)) for seed in range(50)}) == 50


def test_an_option_added_later_keeps_the_saved_points_ids():
    """trace_format came after sweeps were saved: at its default, a point keeps the id those sweeps gave it
    (these ids are the ones the code before it computed), and set, it names another point."""
    assert point_id(Scenario(rate=5.0)) == "3e05a34c80728256"
    assert point_id(Scenario(model="opt-30b", seed=3)) == "16503655a186ed67"
    assert point_id(Scenario(rate=5.0, trace_format="vidur")) != point_id(Scenario(rate=5.0))


@pytest.mark.parametrize("grid, message", [
    ({"modle": "opt-125m"}, "unknown option modle (known: hw, model"),
    ({"rate": []}, "rate: empty axis"),
    ({"rate": [1.0, "fast"]}, "rate[1]: 'fast' is not a number"),
    ({"num_requests": 2.5}, "num_requests: 2.5 is not an integer"),
    ({"seed": [0, True]}, "seed[1]: True is not an integer"),
    ({"chunked_prefill": 1}, "chunked_prefill: 1 is not true or false"),
    ({"model": ["opt-125m", 13]}, "model[1]: 13 is not a string"),
    ({"rate": [5, 5.0]}, "rate: the axis repeats 5.0"),
    ({"policy": ["pie", "vlm"]}, "unknown policy 'vlm'"),
    ({"hw": ["gh200-96g", "gh300"]}, "unknown hardware 'gh300'"),
    ({"trace_format": "csv"}, "trace_format: unknown format 'csv' (known: auto, tidy, azure, vidur, sharegpt)"),
])
def test_bad_grids_are_refused_naming_the_key(grid, message):
    with pytest.raises((ConfigError, CatalogError)) as refused:
        expand_grid(grid)
    assert message in str(refused.value)


def test_a_bad_grid_runs_nothing(write, tmp_path, capsys):
    assert sweep(write("grid.toml", SMALL_GRID + 'cv = "high"\n'), tmp_path / "out") == 2
    assert "cv: 'high' is not a number" in capsys.readouterr().out
    assert sweep(write("broken.toml", "rate = [1, \n"), tmp_path / "out") == 2
    assert "not valid TOML" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_failed_points_are_reported_and_retried_and_rows_are_the_runs(write, tmp_path, capsys):
    grid, out = write("grid.toml", FAILING_GRID), tmp_path / "out"
    assert sweep(grid, out, "--workers", "2") == 1
    printed = capsys.readouterr().out
    assert printed.count("failed policy=") == 2 and "policy=pie gpu_mem_util=0.001: CapacityError" in printed
    table = pd.read_parquet(out / "results.parquet")
    points = load_grid(grid)
    assert list(table["point"]) == [point_id(s) for s in points]
    for s, (_, row) in zip(points, table.iterrows()):
        if s.gpu_mem_util == 0.001:
            assert row["status"] == "error" and "leaves no KV pool" in row["error"]
            assert pd.isna(row["throughput_tok_s"])
            continue
        assert row["status"] == "ok" and pd.isna(row["error"])
        reference = summarize(s)  # what `pie-sim run` computes for the same options
        for metric, value in reference.items():
            if metric not in MEASURED_COLUMNS and metric not in Scenario.options():
                assert row[metric] == value, metric
    assert pd.read_csv(out / "results.csv")["status"].tolist() == table["status"].tolist()

    assert sweep(grid, out) == 1  # the finished points are skipped, the failed ones run again
    assert "skipped 2 already finished; running 2" in capsys.readouterr().out


def _run_in_background(grid, out) -> subprocess.Popen:
    """The sweep in its own process group (the main process and its workers), one point at a time."""
    return subprocess.Popen([sys.executable, "-m", "pie_sim", "sweep", str(grid), "--out", str(out),
                             "--workers", "1"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_a_point(out, sweep_process) -> int:
    deadline = time.monotonic() + 60
    while not list((out / "points").glob("*.json")):
        assert sweep_process.poll() is None and time.monotonic() < deadline, "the sweep did not save a point"
        time.sleep(0.002)
    return sweep_process.pid


def _group_members(group: int) -> list[int]:
    members = []
    for pid in (int(entry) for entry in os.listdir("/proc") if entry.isdigit()):
        try:
            if os.getpgid(pid) == group:
                members.append(pid)
        except ProcessLookupError:  # ended since the listing
            pass
    return members


def test_a_killed_sweep_resumes_to_the_uninterrupted_table(write, tmp_path, capsys):
    grid = write("grid.toml", SMALL_GRID)
    assert sweep(grid, tmp_path / "whole", "--workers", "2") == 0
    whole = pd.read_parquet(tmp_path / "whole" / "results.parquet")
    assert len(whole) == 8 and (whole["status"] == "ok").all()

    out = tmp_path / "resumed"
    process = _run_in_background(grid, out)
    os.killpg(_wait_for_a_point(out, process), signal.SIGKILL)  # the main process and its worker, at once
    process.wait()
    saved = len(list((out / "points").glob("*.json")))
    assert 1 <= saved < 8 and not (out / "results.parquet").exists()
    capsys.readouterr()

    assert sweep(grid, out, "--workers", "1") == 0
    assert f"skipped {saved} already finished; running {8 - saved}" in capsys.readouterr().out
    pd.testing.assert_frame_equal(simulated(pd.read_parquet(out / "results.parquet")), simulated(whole))
    assert sweep(grid, out) == 0
    assert "skipped 8 already finished; running 0" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker processes through /proc")
def test_a_dead_worker_loses_only_the_points_it_had_not_finished(write, tmp_path, capsys):
    grid, out = write("grid.toml", SMALL_GRID), tmp_path / "out"
    process = _run_in_background(grid, out)
    main = _wait_for_a_point(out, process)
    for pid in _group_members(main):
        if pid != main:
            os.kill(pid, signal.SIGKILL)  # the workers (and any helper process), not the sweep itself
    saved = len(list((out / "points").glob("*.json")))
    assert process.wait(timeout=60) == 1
    table = pd.read_csv(out / "results.csv")
    finished = table["status"] == "ok"
    assert len(table) == 8 and saved <= finished.sum() < 8
    assert table["error"][~finished].str.contains("a worker process died").all()

    assert sweep(grid, out, "--workers", "2") == 0
    assert f"skipped {finished.sum()} already finished" in capsys.readouterr().out


def test_the_ray_backend_without_ray_says_how_to_get_it(write, tmp_path, capsys, monkeypatch):
    grid = write("grid.toml", FAILING_GRID)
    assert sweep(grid, tmp_path / "out", "--address", "auto") == 2
    assert "--address names a Ray cluster: it needs --backend ray" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as where it is not installed
    assert sweep(grid, tmp_path / "out", "--backend", "ray") == 2
    assert "pip install ray" in capsys.readouterr().out


@pytest.mark.slow  # starting a local Ray takes half a minute here
def test_ray_backend_gives_the_local_table(write, tmp_path, capsys):
    pytest.importorskip("ray", reason="Ray is optional (pip install ray); the local backend needs none")
    grid = write("grid.toml", FAILING_GRID)
    assert sweep(grid, tmp_path / "local") == 1
    assert sweep(grid, tmp_path / "ray", "--backend", "ray", "--workers", "2") == 1
    assert "policy=vllm gpu_mem_util=0.001: CapacityError" in capsys.readouterr().out
    pd.testing.assert_frame_equal(simulated(pd.read_parquet(tmp_path / "ray" / "results.parquet")),
                                  simulated(pd.read_parquet(tmp_path / "local" / "results.parquet")))


def test_each_point_says_whether_its_rate_is_sustainable(tmp_path):
    """A light rate is, one far above what the engine serves is not, and every request at once cannot say;
    the point files are strict JSON though a rate is infinite."""
    grid = tmp_path / "grid.toml"
    grid.write_text('model = "opt-13b"\nnum_requests = 200\npolicy = "vllm"\ngpu_mem_util = 0.4\n'
                    'rate = [2.0, 1000.0, inf]\n')
    assert sweep(grid, tmp_path / "out", "--workers", "1") == 0
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert table.sustainable.tolist()[:2] == [True, False] and pd.isna(table.sustainable.iloc[2])
    assert table.rate.tolist()[2] == math.inf
    for path in (tmp_path / "out" / "points").glob("*.json"):
        assert "Infinity" not in path.read_text() and "NaN" not in path.read_text()
