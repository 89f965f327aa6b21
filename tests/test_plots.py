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
