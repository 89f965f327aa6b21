"""Outputs whole or not at all: a command's files appear together when it finishes, a failed or interrupted
run leaves --out as it was, a folder holding an earlier run is refused unless --force (which replaces what the
command writes and keeps the rest); every JSON written is strict."""
import errno
import json
import math
import os

import pytest

import pie_serving.records
from pie_serving.outputs import OutputError, json_text, output_files, output_folder, strict
from pie_sim.cli import main as pie_sim

RUN = ["run", "--num-requests", "5", "--rate", "inf"]


def _strict_load(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def _names(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_folder_appears_whole_when_the_block_ends(tmp_path):
    out = tmp_path / "a" / "out"
    with output_folder(out, ("x.csv", "done.json"), force=False, last="done.json") as partial:
        (partial / "x.csv").write_text("1\n")
        (partial / "done.json").write_text("{}")
        assert not out.exists()
    assert _names(out) == ["done.json", "x.csv"] and _names(tmp_path / "a") == ["out", "out/done.json", "out/x.csv"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_error_leaves_the_folder_as_it_was_and_nothing_beside_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.csv").write_text("old")
    with pytest.raises(RuntimeError), output_folder(out, ("x.csv",), force=True) as partial:
        (partial / "x.csv").write_text("half")
        raise RuntimeError("killed")
    assert (out / "x.csv").read_text() == "old" and _names(tmp_path) == ["out", "out/x.csv"]


def test_a_folder_that_is_not_empty_needs_force_which_keeps_what_is_not_the_commands(tmp_path):
    out = tmp_path / "out"
    (out / "flexgen").mkdir(parents=True)
    (out / "flexgen" / "summary.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    (out / "x.csv").write_text("old")
    with pytest.raises(OutputError, match="--out .*out: the folder is not empty .*--force"):
        with output_folder(out, ("x.csv", "flexgen"), force=False):
            pass
    with output_folder(out, ("x.csv", "flexgen"), force=True) as partial:
        (partial / "x.csv").write_text("new")
    assert _names(out) == ["notes.txt", "x.csv"] and (out / "x.csv").read_text() == "new"


def test_a_file_where_the_folder_goes_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="afile: is a file, not a folder"):
        with output_folder(tmp_path / "afile", (), force=True):
            pass


def test_a_place_that_cannot_be_written_is_refused_naming_the_out_given(tmp_path, capsys):
    """Not the temporary beside it, which the user never chose; and nothing is left behind."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out"  # beside it goes a temporary, in a "folder" that is a file
    with pytest.raises(OutputError, match=f"^--out {out}: cannot write there"):
        with output_folder(out, (), force=False):
            pass
    with pytest.raises(OutputError, match=f"^--out {out / 'p.toml'}: cannot write there"):
        with output_files([tmp_path / "p.csv", out / "p.toml"], force=False):
            pass
    assert pie_sim([*RUN, "--out", str(out)]) == 2
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"pie-sim: error: --out {out}: cannot write there") and len(printed.splitlines()) == 1
    assert _names(tmp_path) == ["afile"]


def test_files_are_replaced_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "p.toml", tmp_path / "p.csv"
    a.write_text("old")
    with pytest.raises(OutputError, match="p.toml exists; give --force"):
        with output_files([a, b], force=False):
            pass
    with pytest.raises(RuntimeError), output_files([a, b], force=True) as (ta, tb):
        ta.write_text("new")
        raise RuntimeError
    assert a.read_text() == "old" and not b.exists() and _names(tmp_path) == ["p.toml"]
    with output_files([a, b], force=True) as (ta, tb):
        ta.write_text("new")
        tb.write_text("new")
    assert a.read_text() == b.read_text() == "new" and _names(tmp_path) == ["p.csv", "p.toml"]


def test_strict_json_writes_null_for_infinity_and_nan():
    value = {"rate": math.inf, "x": [1.0, -math.inf, (math.nan, 2)], "ok": "inf"}
    assert strict(value) == {"rate": None, "x": [1.0, None, [None, 2]], "ok": "inf"}
    assert _strict_load(json_text(value)) == strict(value)


def test_a_run_refuses_a_folder_holding_an_earlier_run_and_force_clears_the_stale_files(tmp_path, capsys):
    out = tmp_path / "out"
    assert pie_sim([*RUN, "--policy", "pie", "--out", str(out)]) == 0
    before = (out / "requests.csv").read_bytes()
    assert pie_sim([*RUN, "--policy", "vllm", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().out and (out / "requests.csv").read_bytes() == before
    (out / "notes.txt").write_text("mine")
    assert pie_sim([*RUN, "--policy", "pp-vllm", "--hw", "pcie-8x-l40s", "--model", "opt-6.7b", "--force",
                    "--out", str(out)]) == 0
    # pie's timeline.json is gone (a pipeline writes none), the user's file stays
    assert _names(out) == ["benchmark.json", "iterations.csv", "notes.txt", "requests.csv", "runs.png", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["policy"] == "pp-vllm"


def test_compare_with_force_drops_the_earlier_policies_folders(tmp_path):
    out = tmp_path / "out"
    args = ["compare", "--num-requests", "5", "--rate", "inf", "--out", str(out)]
    assert pie_sim([*args, "--policies", "flexgen,static"]) == 0
    assert pie_sim([*args, "--policies", "vllm,pie", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["pie", "vllm"]


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    real = pie_serving.records.write_csv

    def fill_the_disk(path, columns):
        if path.name == "iterations.csv":
            path.write_text("start_s,end_s\n0.0,")  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, columns)
    monkeypatch.setattr(pie_serving.records, "write_csv", fill_the_disk)
    out = tmp_path / "out"
    assert pie_sim([*RUN, "--out", str(out)]) == 2
    printed = capsys.readouterr().out.strip()
    assert "iterations.csv: No space left on device" in printed and len(printed.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_run_leaves_the_earlier_run_whole(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert pie_sim([*RUN, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("pie_sim.cli.write_chrome_trace", interrupted)  # Ctrl-C while it writes
    assert pie_sim([*RUN, "--seed", "1", "--force", "--out", str(out)]) == 130
    assert capsys.readouterr().out.strip().endswith("pie-sim: interrupted")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_every_json_a_run_writes_is_strict(tmp_path):
    """summary.json, benchmark.json, timeline.json and a sweep's points, with the inputs that once wrote
    Infinity."""
    assert pie_sim([*RUN, "--out", str(tmp_path / "run")]) == 0
    grid = tmp_path / "grid.toml"
    grid.write_text('policy = ["vllm", "pie"]\nrate = inf\nnum_requests = 4\n')
    assert pie_sim(["sweep", str(grid), "--out", str(tmp_path / "sweep"), "--workers", "1"]) == 0
    written = sorted(tmp_path.rglob("*.json"))
    assert {p.name for p in written} >= {"summary.json", "benchmark.json", "timeline.json"} and len(written) == 5
    for path in written:
        _strict_load(path.read_text())
