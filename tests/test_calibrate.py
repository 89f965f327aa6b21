"""`pie-exec calibrate` and the `[fit]` section it writes: the fits recover known costs, a real (tiny) run
writes a profile the cost model loads and predicts with, and bad profiles or input are refused."""
import csv
import dataclasses

import pytest
import torch

from hwmodels import BatchShape, CatalogError, CostModel, load_hardware, load_model
from hwmodels.profile import LAYER_TERMS, features, interpolate, relative_fit
from pie_exec.calibrate import Calibration, Grid, Point, residuals
from pie_exec.cli import main as pie_exec
from pie_exec.weights import random_transformer

from .conftest import DATA

TINY = DATA / "tiny-opt.toml"


# What matrix products of a few rows cost: jagged up to 16 rows (as a BLAS switching kernels), linear after.
JAGGED = [0, 2.0, 3.4, 4.1, 3.0, 3.4, 3.7, 4.5, 3.8, 4.6, 4.3, 5.0, 4.3, 4.8, 4.8, 6.1, 6.1]


def dense_seconds(tokens: int) -> float:
    return 1e-3 * (JAGGED[tokens] if tokens <= 16 else 6.1 + 0.15 * (tokens - 16))


def lm_head_seconds(sampled: int) -> float:
    return 5 * dense_seconds(sampled)


def linear_layer_seconds(b: BatchShape) -> float:
    return (40e-6 + 20e-6 * b.prefill_tokens + 90e-6 * b.decode_tokens + 3e-9 * b.attended_pairs + 0.0 * b.kv_tokens_read
            + 5e-9 * b.padded_keys + 0.0 * b.padded_pairs)


def layer_seconds(b: BatchShape) -> float:
    """The costs the synthetic tests hide, written out independently of hwmodels.profile."""
    return dense_seconds(b.tokens) + linear_layer_seconds(b)


def head_seconds(b: BatchShape) -> float:
    return lm_head_seconds(b.sampled_tokens) + 5e-3 + 100e-6 * b.sampled_tokens + 2e-6 * b.tokens


def synthetic_points() -> list[Point]:
    """Curves and compute points on the default grid, copies of several sizes and calls, with the costs
    above; the contended layer is 30% slower with 10 GB/s of copies (h2d at 10 GB/s, d2h 8 GB/s, 3 µs a
    call)."""
    grid = Grid()
    points = [Point("dense", "", dense_seconds(n), BatchShape(prefill_tokens=n)) for n in grid.tokens]
    points += [Point("lm_head", "", lm_head_seconds(n), BatchShape(sampled_tokens=n)) for n in grid.sampled]
    for label, prefills, decodes in grid.batches_of(2048):
        shape = BatchShape.of(prefills, decodes)
        points += [Point("layer", label, layer_seconds(shape), shape), Point("head", label, head_seconds(shape), shape)]
    for calls, blocks in ((12, 12), (12, 12 * 64), (12, 12 * 1024), (48, 12 * 64)):  # a layer's worth: 12 copies
        nbytes = blocks * 100_000
        points += [Point("copy", "", calls * 3e-6 + nbytes / 10e9, calls=calls, bytes_h2d=nbytes),
                   Point("copy", "", calls * 3e-6 + nbytes / 8e9, calls=calls, bytes_d2h=nbytes)]
    points.append(Point("bidirectional", "", 2 * 3e-6 + 2e8 / 12e9, calls=2, bytes_h2d=10**8, bytes_d2h=10**8))
    points += [Point("issue", "", 40e-6 + 5e-6 * calls, calls=calls) for calls in (1, 4, 8)]
    shape = BatchShape.of(decodes=[256] * 16)
    points.append(Point("contended", "", 1.3 * layer_seconds(shape), shape))
    return points


def test_relative_fit_recovers_known_coefficients():
    shapes = [p.shape for p in synthetic_points() if p.fit == "layer"]
    coefs = relative_fit([features(s, LAYER_TERMS) for s in shapes], [linear_layer_seconds(s) for s in shapes])
    assert coefs == pytest.approx([40e-6, 20e-6, 90e-6, 3e-9, 0.0, 5e-9, 0.0], rel=1e-6, abs=1e-12)
    known = [dense_seconds(s.tokens) for s in shapes]  # a part already measured, fitted around
    coefs = relative_fit([features(s, LAYER_TERMS) for s in shapes], [layer_seconds(s) for s in shapes], known)
    assert coefs == pytest.approx([40e-6, 20e-6, 90e-6, 3e-9, 0.0, 5e-9, 0.0], rel=1e-6, abs=1e-12)


def test_a_curve_interpolates_between_its_points_and_extends_its_end_segments():
    points = ((1, 2.0), (2, 5.0), (4, 3.0), (8, 7.0))
    assert [interpolate(points, n) for n in (1, 2, 3, 4, 6, 8)] == [2.0, 5.0, 4.0, 3.0, 5.0, 7.0]
    assert interpolate(points, 10) == 9.0  # along the last segment (+1 a count)
    assert interpolate(((2, 1.0), (4, 5.0)), 1) == 0.0  # along the first segment, never below zero
    assert interpolate((), 5) == 0.0  # no curve: the linear part carries everything


def test_relative_fit_keeps_costs_non_negative_and_needs_enough_points():
    coefs = relative_fit([[1, 1], [1, 2], [1, 3]], [3.0, 2.0, 1.0])  # falling time: no negative slope
    assert min(coefs) >= 0
    with pytest.raises(ValueError, match="at least as many"):
        relative_fit([[1, 1]], [1.0])


def test_calibration_fit_recovers_compute_link_and_contention():
    spec = dataclasses.replace(load_model(TINY), dtype_bytes=4)
    run = Calibration(None, spec, torch.device("cpu"), Grid())
    run.points = synthetic_points()
    fit, link = run.fit()
    assert link["h2d"] == pytest.approx(10e9, rel=1e-6) and link["d2h"] == pytest.approx(8e9, rel=1e-6)
    assert link["latency"] == pytest.approx(3e-6, rel=1e-6)
    assert link["bidirectional"] == pytest.approx(12e9, rel=1e-6)
    assert fit.copy_slowdown_per_gb_s == pytest.approx(0.03, rel=1e-6)
    assert (fit.copy_issue, fit.copy_issue_per_call) == pytest.approx((40e-6, 5e-6), rel=1e-6)
    mixed = BatchShape.of(prefills=[(100, 300)], decodes=[50, 900, 7])  # a shape the grid never had
    assert fit.layer_time(mixed) == pytest.approx(layer_seconds(mixed), rel=1e-6)
    assert fit.layer_time(mixed, 5e9) == pytest.approx(1.15 * layer_seconds(mixed), rel=1e-6)
    assert fit.head_time(mixed) == pytest.approx(head_seconds(mixed), rel=1e-6)
    for n in (2, 3, 4, 7):  # decode batches of a few sequences: the curves' jags, not a straight line
        few = BatchShape.of(decodes=[300] * n)
        assert fit.layer_time(few) == pytest.approx(layer_seconds(few), rel=1e-6)
        assert fit.head_time(few) == pytest.approx(head_seconds(few), rel=1e-6)
    assert all(abs(p.error) < 1e-6 for p in run.points)


def test_issue_points_at_or_below_zero_still_fit_a_non_negative_cost():
    """The issue points are differences of two timings: noise takes some to zero or below (on a GPU, whose
    host issues ahead of it, they are noise alone). The fit keeps every cost non-negative, and a point below
    zero neither breaks it nor zeroes the others; its relative error is undefined and left out."""
    spec = dataclasses.replace(load_model(TINY), dtype_bytes=4)
    run = Calibration(None, spec, torch.device("cpu"), Grid())
    others = [p for p in synthetic_points() if p.fit != "issue"]
    run.points = others + [Point("issue", "", s, calls=c) for c, s in ((1, 2e-6), (4, -3e-6), (8, 1e-6))]
    fit, _ = run.fit()
    assert fit.copy_issue >= 0 and fit.copy_issue_per_call >= 0 and fit.issue_time(4) < 2e-6
    run.points = others + [Point("issue", "", s, calls=c) for c, s in ((1, -20e-6), (4, 250e-6), (8, 500e-6))]
    fit, _ = run.fit()
    assert fit.issue_time(8) == pytest.approx(500e-6, rel=0.1) and fit.copy_issue_per_call > 0
    assert residuals(run.points)["issue"][2] == 2  # the positive points' errors only


@pytest.fixture
def one_thread():
    """Tiny layers take ~0.2 ms; on a shared 2-core machine an OpenMP barrier whose partner thread lost its
    core spins for milliseconds, which would swamp them. One thread has no barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_tiny_real_calibration_writes_a_profile_the_cost_model_predicts_with(tmp_path, capsys, one_thread):
    out = tmp_path / "prof" / "tiny-cpu.toml"
    assert pie_exec(["calibrate", "--model", str(TINY), "--batches", "1,2", "--contexts", "16,48",
                     "--prefills", "8", "--copy-blocks", "1,4,8", "--repeats", "3", "--threads", "1",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "calibration points" in printed and "layer: max" in printed
    hw = load_hardware(out)
    assert hw.fit is not None and hw.link.copy_engines == 1 and hw.link.h2d_bandwidth > 0
    assert hw.fit.threads == 1  # what it was timed with, for validate to run with
    assert "layer: max" in out.read_text()  # the residuals travel with the profile
    model = load_model(out.parent / "tiny-opt-float32.toml")
    cm = CostModel(hw, model)
    with open(out.with_suffix(".csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["fit"] == "layer"]
    assert len(rows) == 2 * 2 + 2 + 1 + 1  # decodes, prefills with no and the longest context, one mixed, one skewed
    with open(out.with_suffix(".csv")) as f:
        assert sorted(int(r["calls"]) for r in csv.DictReader(f) if r["fit"] == "issue") == [1, 4, 8]
    errors = []
    for row in rows:
        shape = BatchShape(**{f.name: int(row[f.name]) for f in dataclasses.fields(BatchShape)})
        predicted = cm.layer_time(shape)
        assert predicted == pytest.approx(float(row["fitted_s"]), rel=1e-4)  # the file says what the fit said
        errors.append(abs(predicted / float(row["measured_s"]) - 1))
    assert sorted(errors)[len(errors) // 2] < 1.0  # loose: within 2x on a shared 2-core machine, tiny layers
    with pytest.raises(CatalogError, match="calibrated for tiny-opt .*4-byte values.*2-byte values"):
        CostModel(hw, load_model(TINY))  # the catalog's FP16 entry is another model


FIT = (DATA / "tiny-fit.toml").read_text()


def test_a_hand_written_fit_replaces_the_roofline(write):
    hw = load_hardware(write("hw.toml", (DATA / "tiny-hw.toml").read_text() + FIT))
    cm = CostModel(hw, load_model(TINY))
    b = BatchShape.of(prefills=[(4, 0)], decodes=[10, 20])
    padded_keys, padded_pairs = 3 * 21, 3 * 4 * 21  # 3 sequences, at most 4 new tokens, 21 keys at most
    dense, lm_head = 180, 1600  # 6 tokens: halfway from 4 to 8 tokens; 3 sampled: a point of the curve
    assert cm.layer_time(b) == pytest.approx((dense + 10 + 4 + 2 * 2 + 0.001 * (10 + 11 + 21) + 0.01 * (4 + 11 + 21)
                                              + 0.02 * padded_keys + 0.003 * padded_pairs) * 1e-6)
    assert cm.layer_time(b, copy_bandwidth=5e9) == pytest.approx(1.5 * cm.layer_time(b))
    assert cm.head_time(b) == pytest.approx((lm_head + 50 + 3 * 3) * 1e-6)
    assert cm.issue_time(3) == pytest.approx((30 + 3 * 2) * 1e-6)
    assert CostModel(load_hardware(DATA / "tiny-hw.toml"), load_model(TINY)).issue_time(3) == 0  # the roofline's
    assert_decode_time_is_iteration_time(cm)


def assert_decode_time_is_iteration_time(cm: CostModel) -> None:
    """The simulator's shortcut for decode iterations is `iteration_time` of each batch, to the last bit."""
    for contexts in ([5], [5, 17], [40, 3, 9], [1] * 7):
        shape = BatchShape.of(decodes=contexts)
        assert cm.decode_time(len(contexts), shape.attended_pairs, shape.padded_keys) == cm.iteration_time(shape)


def test_decode_time_is_iteration_time_on_the_roofline():
    assert_decode_time_is_iteration_time(CostModel(load_hardware(DATA / "tiny-hw.toml"), load_model(TINY)))
    assert_decode_time_is_iteration_time(CostModel(load_hardware("gh200-96g"), load_model("opt-13b")))


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t.replace("layer_us = 10", "layer_us = -1"), "field 'fit.layer_us' must not be negative"),
    (lambda t: t.replace("head_us = 50", "head_ms = 50"), "unknown field 'fit.head_ms'"),
    (lambda t: t.replace('architecture = "opt', 'arch = "opt'), "unknown field 'fit.arch'"),
    (lambda t: t.replace("copy_slowdown_per_gb_s = 0.1", ""), "missing field 'fit.copy_slowdown_per_gb_s'"),
    (lambda t: t.replace("threads = 1", "threads = 1.5"), "field 'fit.threads' must be a whole number"),
    (lambda t: t.replace("copy_issue_us = 30", "copy_issue_us = -5"), "field 'fit.copy_issue_us' must not be negative"),
    (lambda t: t.replace("head_us = 50", 'head_us = "fast"'), "field 'fit.head_us' must be a number"),
    (lambda t: t.replace("[[1, 100], [4, 160], [8, 200]]", "[[1, 100]]"), "'fit.layer_us_dense_by_tokens' .*two at least"),
    (lambda t: t.replace("[4, 160], [8, 200]", "[8, 200], [4, 160]"), "rising counts \\(8 then 4\\)"),
    (lambda t: t.replace("[4, 160]", "[4.5, 160]"), "whole counts"),
    (lambda t: t.replace("[[1, 1000]", "[[1, -1]"), "'fit.head_us_lm_head_by_sampled' .*non-negative values"),
    (lambda t: t.replace("[[1, 1000]", '[[1, "a"]'), "pairs of numbers"),
])
def test_a_bad_fit_is_refused_naming_file_and_field(write, edit, problem):
    path = write("bad.toml", (DATA / "tiny-hw.toml").read_text() + edit(FIT))
    with pytest.raises(CatalogError, match=f"{path}.*{problem}"):
        load_hardware(path)


@pytest.mark.parametrize("args, name, message", [
    (["--model", "opt-7b"], "p.toml", "unknown model 'opt-7b'"),
    (["--model", str(TINY), "--contexts", "16,128"], "p.toml", "--contexts must stay below"),
    (["--model", str(TINY), "--contexts", "16", "--prefills", "8", "--repeats", "0"], "p.toml", "--repeats must be a positive integer, got 0"),
    (["--model", str(TINY), "--base", "no-such-host"], "p.toml", "unknown hardware 'no-such-host'"),
    (["--model", str(TINY)], "p.txt", "a profile is a .toml file"),
    (["--model", str(TINY), "--threads", "0"], "p.toml", "--threads must be a positive integer, got 0"),
])
def test_bad_input_is_refused_before_timing(tmp_path, capsys, args, name, message):
    out = tmp_path / name
    assert pie_exec(["calibrate", *args, "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert message in printed.out + printed.err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    assert pie_exec(["calibrate", "--device", "cuda", "--out", str(tmp_path / "p.toml")]) == 2
    assert "no CUDA device here" in capsys.readouterr().out


def test_the_copy_fit_prices_the_copiers_handoff_per_call(tmp_path, one_thread):
    """Timed as the engine pays them, a layer's worth of tiny copies costs the copier's handoff (queue,
    thread wake-up, GIL: tens of µs a copy here), not only the bytes; the fit must not call it free."""
    spec = dataclasses.replace(load_model(TINY), dtype_bytes=4)
    model = random_transformer(spec, 0, dtype=torch.float32, device=torch.device("cpu"))
    run = Calibration(model, spec, torch.device("cpu"), Grid(copy_blocks=(1, 4, 16), repeats=3))
    run.time_copies()
    one_block = next(p for p in run.points if p.fit == "copy" and p.bytes_h2d == run.copies_per_point * run.block_bytes)
    assert one_block.calls == run.copies_per_point == spec.num_layers
    run.points += [p for p in synthetic_points() if p.fit in ("dense", "lm_head", "layer", "head")]  # and compute
    _, link = run.fit()
    assert link["latency"] > 1e-6  # a block of this model is 1 KiB: its bytes alone take well under 1 µs
    assert link["latency"] * one_block.calls < 2 * one_block.measured


def test_a_fit_far_from_its_points_is_warned_about():
    """A busy machine once gave a 650% fit error in a profile, written without a word."""
    from pie_exec.calibrate import Point, points_table, warnings

    points = [Point("layer", "decode 1 x 64", 1e-3, fitted=7.5e-3), Point("layer", "decode 4 x 64", 2e-3, fitted=2.1e-3),
              Point("issue", "issue a copy", -1e-6, fitted=0.0), Point("copy", "h2d", 1e-3, fitted=1.1e-3)]
    [line] = warnings(points)
    assert "the layer fit is +650% off at 'decode 1 x 64'" in line and "--repeats" in line
    assert warnings(points[1:]) == []  # within 25%, and an issue point's nan error is no warning
    rows = points_table(points).columns[4]._cells
    assert rows[2] == "-"  # a nan error is shown as none, not "+nan%"
