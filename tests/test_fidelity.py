"""The cost model against the shipped measurements (Vidur's A100 and H100 profiles): the targets the
fidelity benchmark reports (bench/bench_fidelity.py), and the catalog's defaults being what their fit
prints (bench/fit_roofline.py)."""
import warnings

import pytest

from bench.bench_fidelity import errors, summary
from bench.fit_roofline import all_reduce_fit, fit_gpu
from bench.vidur_points import DEVICES, REGIMES, server
from hwmodels import load_hardware
from hwmodels.vidur import ProfileWarning

GPU_ENTRIES = ("gh200-96g", "gh200-144g", "h100-sxm-pcie5", "h200-sxm-pcie5", "a100-80g-sxm-pcie4", "pcie-8x-l40s",
               "h100-sxm-8x-nvlink", "a100-80g-sxm-8x-nvlink")


def test_roofline_defaults_are_within_12_percent_of_whole_layers_per_regime():
    stats = summary(errors(held_out=False), lambda r: (r["source"], r["regime"]))
    for regime in REGIMES:
        mean, _, count = stats["roofline", regime]
        assert count >= 30 and mean <= 0.12, (regime, mean)


def test_profile_driven_held_out_is_within_5_percent_of_whole_layers_per_regime():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProfileWarning)
        rows = errors(degrees=(1,))
    stats = summary(rows, lambda r: (r["source"], r["regime"]))
    for regime in REGIMES:
        mean, _, count = stats["profile", regime]
        assert count >= 20 and mean <= 0.05, (regime, mean)


def test_the_catalog_states_what_the_fit_prints():
    reduce = {}
    for device in DEVICES:
        latency, bandwidth, _ = all_reduce_fit(device)
        reduce[device] = (latency, bandwidth)
        entry = server(device).server
        assert entry.all_reduce_latency == pytest.approx(latency, rel=0.01)
        assert entry.all_reduce_bandwidth == pytest.approx(bandwidth, rel=0.01)
    fitted = fit_gpu(reduce)
    for name in GPU_ENTRIES:
        gpu = load_hardware(name).gpu
        for field, value in fitted.items():
            assert getattr(gpu, field) == pytest.approx(value, rel=0.005), (name, field)
