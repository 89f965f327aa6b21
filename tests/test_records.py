"""The run recorder kept in chunks moved to a temporary file against the same rows kept whole: the same
columns, summary, files byte for byte and plot envelope, whatever the chunk."""
import numpy as np
import pytest

from hwmodels import CostModel, load_hardware, load_model
from pie_policy.sizing import build_policy
from pie_serving import loop, records
from pie_sim.plots import envelope
from pie_sim.simulate import simulate
from traces import load_workload


class Tee:
    """Records every row into two recorders: one with a tiny chunk, one that never spills."""

    def __init__(self, token_gaps: bool = False):
        assert not token_gaps, "the runs recorded here fold no token gaps"
        self.small, self.whole = records.RunRecorder(chunk=7), records.RunRecorder(chunk=10**9)
        self.gaps = None

    def iteration(self, *args):
        self.small.iteration(*args)
        self.whole.iteration(*args)

    def decode_run(self, *args):
        self.small.decode_run(*args)
        self.whole.decode_run(*args)


@pytest.mark.parametrize("name", ["pie", "vllm-swap"])
def test_rows_moved_to_a_file_in_chunks_read_and_write_as_rows_kept_whole(name, tmp_path, monkeypatch):
    cm = CostModel(load_hardware("gh200-96g"), load_model("opt-13b"))
    workload = load_workload("sharegpt", 150, rate=20.0, seed=4)
    policy = build_policy(name, cm, gpu_mem_util=0.5, cpu_mem_bytes=64 * 1024**3)
    monkeypatch.setattr(loop, "RunRecorder", Tee)
    result = simulate(policy, cm, workload)
    small, whole = result.recorder.small, result.recorder.whole
    assert small.count == whole.count > 100 and small._spill is not None and whole._spill is None
    for column in records.ITERATION_COLUMNS:
        assert np.array_equal(small.iterations[column], whole.iterations[column]), column
    assert small.summary(result.requests, 1.0) == whole.summary(result.requests, 1.0)
    for recorder, folder in ((small, tmp_path / "small"), (whole, tmp_path / "whole")):
        recorder.write(folder, result.requests, {})
    assert (tmp_path / "small" / "iterations.csv").read_bytes() == (tmp_path / "whole" / "iterations.csv").read_bytes()
    names = ("gpu_kv_bytes", "cpu_kv_bytes", "cpu_share")
    made = {"cpu_percent": records.cpu_percent}  # a column made row by row from others, then cut
    for points in (5, 97, 10**6):
        cut = small.envelope(names, points, derived=made)
        for column in (*names, "cpu_percent"):
            rows = records.cpu_percent(whole.iterations) if column == "cpu_percent" else whole.iterations[column]
            times, values = envelope(whole.iterations["end_s"], rows, points)
            assert np.array_equal(cut["end_s"], times) and np.array_equal(cut[column], values), (points, column)
