"""The plot's envelope of long series: at most `points` points, each slice's peak kept."""
import numpy as np

from pie_sim.plots import envelope


def test_envelope_keeps_each_slices_maximum_and_the_series_end():
    rng = np.random.default_rng(0)
    times, values = np.cumsum(rng.random(10_007)), rng.random(10_007)
    t, v = envelope(times, values, points=100)
    assert len(t) == len(v) == 100 and t[-1] == times[-1]
    assert np.all(np.diff(t) > 0) and v.max() == values.max()
    # Brute force: cut the series after each point's time; every piece's maximum is that point's value.
    pieces = np.split(values, np.searchsorted(times, t[:-1], side="right"))
    assert [piece.max() for piece in pieces] == v.tolist()
    assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


def test_short_series_are_drawn_whole():
    times, values = np.arange(5.0), np.array([3.0, 1, 4, 1, 5])
    t, v = envelope(times, values, points=10)
    assert np.array_equal(t, times) and np.array_equal(v, values)


def _runs(names, cpu_kv=(0, 0, 0)):
    requests = {"finish_s": np.array([1.0, 2.0]), "e2e_s": np.array([0.5, 0.8]), "output_tokens": np.array([10, 20])}
    iterations = {"end_s": np.array([0.5, 1.0, 1.5]), "gpu_kv_bytes": np.array([2, 2, 1]) * 2**30,
                  "cpu_kv_bytes": np.array(cpu_kv) * 2**30, "cpu_share": np.zeros(3)}
    return {name: (requests, iterations) for name in names}


def test_the_cpu_panel_shows_kv_held_in_cpu_memory_whatever_the_policy_calls_its_share():
    """vllm-swap's swapped-out blocks sit in CPU memory while its cpu_share (the share it streams) is 0."""
    from pie_sim.plots import cpu_percent

    _, iterations = _runs(["vllm-swap"], cpu_kv=(0, 2, 3))["vllm-swap"]
    assert cpu_percent(iterations).tolist() == [0.0, 50.0, 75.0]
    empty = {"gpu_kv_bytes": np.zeros(2, np.int64), "cpu_kv_bytes": np.zeros(2, np.int64)}
    assert cpu_percent(empty).tolist() == [0.0, 0.0]


def test_lines_drawn_over_one_another_stay_visible(tmp_path):
    """Each policy its own marker and dashes, the earlier drawn wider (vllm was hidden under vllm-swap and
    pie: the same values); the axes start at 0 and the title carries what the caller gives it."""
    import matplotlib

    from pie_sim import plots

    figures = []
    real_close = plots.plt.close
    plots.plt.close = lambda fig: figures.append(fig)
    try:
        plots.plot_runs(_runs(["vllm", "vllm-swap", "pie"]), tmp_path / "runs.png", "opt-13b (gpu_mem_util 0.5)")
    finally:
        plots.plt.close = real_close
    [fig] = figures
    top, kv, share = fig.axes
    markers = [line.get_marker() for line in top.lines]
    dashes = [line.get_linestyle() for line in share.lines]
    widths = [line.get_linewidth() for line in share.lines]
    assert len(set(markers)) == len(set(dashes)) == 3 and widths == sorted(widths, reverse=True) and widths[0] > widths[-1]
    assert kv.get_ylim()[0] == 0 and share.get_ylim() == (0, 1)  # all zero: 0 to 1 %, not -0.04 to 0.04
    assert top.get_title() == "opt-13b (gpu_mem_util 0.5)"
    assert top.yaxis.get_major_formatter()(0.02, 0) == "0.02"  # seconds, not 2x10^-2
    assert isinstance(top.yaxis.get_minor_formatter(), matplotlib.ticker.FuncFormatter)
    real_close(fig)
