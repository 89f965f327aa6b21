"""The GPU check (bench/gpu_check) as its CPU dry run: every step runs on tiny sizes and writes its files and
its section of summary.md; a step that fails or overruns is recorded and the others still run; bad input
is refused with one line, exit status 2 and nothing written. Where a CUDA device is present, a short run
of the real thing (marked cuda)."""
import csv
import importlib.util
import math

import pytest
import torch

from bench.gpu_check import serving
from bench.gpu_check.context import Context
from bench.gpu_check.main import main, run_all, step_limit
from bench.gpu_check.probe import facts
from bench.gpu_check.sizing import TINY_MODEL, decode_batch, model_at
from bench.gpu_check.steps import STEPS
from hwmodels import GiB, hardware_names, load_hardware, matching_entry
from pie_policy import POLICIES

from .conftest import DATA
from .test_exec_engine import CASES, SPECS


def rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def statuses(summary: str) -> dict[str, str]:
    """step → status, from the Steps table of summary.md."""
    table = summary.split("## Steps")[1].split("\n## ")[0]
    cells = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    return {name.strip(): status.strip() for name, status in cells[1:]}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("check") / "out"
    return main(["--out", str(out), "--device", "cpu"]), out


@pytest.mark.slow
def test_the_dry_run_runs_every_step_and_summarises_them(dry_run):
    code, out = dry_run
    summary = (out / "summary.md").read_text()
    assert code == 0, summary
    assert statuses(summary) == {s.name: "skipped" if s.name == "cuda-tests" else "ok" for s in STEPS}
    assert all(f"\n## {s.name}\n" in summary for s in STEPS)
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert written == {"summary.md", "log.txt", "env.csv", "tokens.csv", "cuda_tests.csv", "bandwidth.csv",
                       "overlap.csv", "calibrate/profile.toml", "calibrate/profile.csv",
                       "calibrate/tiny-opt-float32.toml", "validate/validate.csv", "validate/validate.png"}
    assert sum((out / name).stat().st_size for name in written) < 2_000_000


@pytest.mark.slow
def test_the_dry_run_checks_every_policy_case_against_transformers(dry_run):
    _, out = dry_run
    checked = rows(out / "tokens.csv")
    assert {(r["model"], r["case"]) for r in checked} == {(s.name, c) for s in SPECS.values() for c in CASES}
    assert {c.split(",")[0] for c in CASES} == set(POLICIES)  # every executor policy
    assert all(r["verdict"] == "ok" and int(r["tokens"]) > 0 for r in checked)
    assert all(float(r["max_logit_error"]) <= float(r["tolerance"]) for r in checked)


@pytest.mark.slow
def test_the_dry_runs_overlap_moves_every_cpu_block_once_a_layer(dry_run):
    """Steady decode streams each CPU block in once a layer: the bytes an iteration moves follow from the
    batch and the share alone (no write-back: the tails stay on the GPU)."""
    _, out = dry_run
    measured = rows(out / "overlap.csv")
    spec, batch = model_at(TINY_MODEL, "cpu"), decode_batch("cpu")
    block_layer = batch.block_size * spec.kv_bytes_per_token_layer
    swapped = [r for r in measured if float(r["share"]) > 0]
    assert len(swapped) == 3 * 3 * 2 and {r["ordering"] for r in swapped} == {"stream", "events"}
    for r in swapped:
        blocks = batch.batch * batch.cpu_blocks(float(r["share"]))
        assert float(r["h2d_mb"]) * 1e6 == pytest.approx(blocks * block_layer * spec.num_layers)
        assert float(r["cpu_block_share"]) == pytest.approx(blocks / batch.batch / batch.blocks)
    plain, background = measured[0], [r for r in measured if r["background"]]
    assert float(plain["h2d_mb"]) == 0 and float(plain["slowdown"]) == 0
    assert [r["background"] for r in background] == ["h2d", "d2h", "h2d+d2h"]
    assert all(float(r["background_gb_s"]) > 0 for r in background)
    assert all(float(r["iteration_ms"]) > 0 and float(r["predicted_iteration_ms"]) > 0 for r in measured)


@pytest.mark.slow
def test_the_dry_runs_other_files(dry_run):
    _, out = dry_run
    assert {r["outcome"] for r in rows(out / "cuda_tests.csv")} == {"skipped"}  # a dry run: no CUDA test runs
    points = rows(out / "bandwidth.csv")
    assert {r["what"] for r in points} >= {"h2d", "d2h", "both at once", "h2d pageable", "d2h pageable", "d2d",
                                           "fit: h2d GB/s", "fit: latency µs"}
    assert all(float(r["gb_s"]) > 0 for r in points)
    assert load_hardware(out / "calibrate" / "profile.toml").fit is not None
    assert {r["policy"] for r in rows(out / "validate" / "validate.csv")} == {"vllm", "static", "pie"}
    assert {r["key"] for r in rows(out / "env.csv")} >= {"torch", "hardware_entry", "entry_h2d_gb_s"}


def context(tmp_path, **changes) -> Context:
    fields = dict(out=str(tmp_path), device="cpu", quick=True, model=TINY_MODEL, serving_model=TINY_MODEL,
                  hw="cpu-host", machine=facts("cpu"))
    return Context(**{**fields, **changes})


def test_a_failing_step_is_recorded_and_the_next_still_runs(tmp_path):
    ran, _ = run_all(context(tmp_path, model=str(tmp_path / "missing.toml")), ["overlap", "env"], 300)
    assert [(r.step.name, r.result.status) for r in ran] == [("overlap", "ERROR"), ("env", "ok")]
    assert "missing.toml" in ran[0].result.note and ran[0].result.markdown[0] == "```"
    assert (tmp_path / "env.csv").is_file() and "CatalogError" in (tmp_path / "log.txt").read_text()


def test_a_step_over_its_time_is_stopped_and_the_budget_spent_leaves_the_rest_unrun(tmp_path):
    ran, took = run_all(context(tmp_path), ["tokens", "env"], 3)
    assert [(r.step.name, r.result.status) for r in ran] == [("tokens", "TIMEOUT"), ("env", "NOT RUN")]
    assert took < 30 and not (tmp_path / "tokens.csv").exists()


def test_validate_says_so_when_simpy_is_missing(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "simpy" else real(name, *a))
    result = serving.validate(context(tmp_path))
    assert result.status == "ERROR" and "SimPy is not importable" in result.note


@pytest.mark.parametrize("name, gib, model", [("NVIDIA H100 80GB HBM3", 80, "h100"), ("NVIDIA H200", 141, "h200"),
                                              ("NVIDIA A100-SXM4-80GB", 80, "a100")])
def test_the_hardware_entry_is_the_catalogs_one_gpu_pcie_host_of_that_gpu(name, gib, model):
    entry = matching_entry("cuda", name, gib * GiB)
    assert entry in hardware_names() and entry.startswith(model) and "pcie" in entry and "8x" not in entry


def test_a_grace_hopper_is_told_by_its_memory_and_an_unknown_gpu_matches_nothing():
    assert matching_entry("cuda", "NVIDIA GH200 480GB", 96 * GiB) == "gh200-96g"
    assert matching_entry("cuda", "NVIDIA GH200 144G HBM3e", 144 * GiB) == "gh200-144g"
    assert matching_entry("cuda", "Tesla T4", 16 * GiB) is None
    assert matching_entry("cpu") == "cpu-host"


def test_a_steps_limit_leaves_the_later_steps_their_estimates():
    assert step_limit(60, 480, 200) == 180               # three times its estimate
    assert step_limit(60, 300, 200) == 100               # what the later steps leave
    assert step_limit(60, 230, 200) == 60                # never below its estimate
    assert step_limit(60, 40, 200) == 40                 # never beyond the budget


@pytest.mark.parametrize("args, message", [
    (["--steps", "env,tea"], "--steps: unknown step 'tea'"),
    (["--budget-s", "0"], "--budget-s must be positive"),
    (["--model", "opt-7b"], "--model: "),
    (["--hw", "h300"], "--hw: "),
    (["--model", str(DATA / "tiny-opt.toml")], "prefetches up to 3 layers ahead"),
    (["--model", "opt-175b"], "--model opt-175b: the overlap step would take"),
    (["--serving-model", "opt-175b"], "--serving-model opt-175b: calibrate and validate would take"),
])
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["--out", str(out), "--device", "cpu", *args]) == 2
    printed = capsys.readouterr().err.strip()
    assert message in printed and len(printed.splitlines()) == 1, printed
    assert not out.exists()


def test_an_output_folder_that_is_not_empty_is_refused_and_left_alone(tmp_path, capsys):
    (tmp_path / "kept.txt").write_text("mine")
    assert main(["--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]
    assert main(["--out", str(tmp_path / "kept.txt"), "--device", "cpu"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_device_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--out", str(out)]) == 2
    assert "--device cuda: no CUDA device here" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_larger_than_the_gpu_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--out", str(out), "--model", "opt-175b"]) == 2
    assert "GiB free" in capsys.readouterr().err and not out.exists()


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_quick_check_measures_the_gpus_link_and_pinning(tmp_path):
    out = tmp_path / "out"
    assert main(["--out", str(out), "--quick", "--steps", "env,bandwidth"]) == 0
    env = {r["key"]: r["value"] for r in rows(out / "env.csv")}
    if env["pin_allocated_bytes"].isdigit():  # torch.cuda.host_memory_stats exists
        taken = int(env["pin_allocated_bytes"])
        assert taken >= int(env["pin_request_bytes"]) and math.log2(taken).is_integer()
    fits = {r["what"]: float(r["gb_s"]) for r in rows(out / "bandwidth.csv") if r["what"].startswith("fit")}
    assert fits["fit: h2d GB/s"] > 0 and fits["fit: d2h GB/s"] > 0
