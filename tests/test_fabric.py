"""The multi-GPU PCIe fabric against closed forms: shares of the link, the switch uplink and host memory,
and the single-GPU link rule of links.py."""
import pytest
import simpy

from hwmodels import load_hardware
from pie_policy.plan import D2H, H2D, LAYER_KV, Copy
from pie_sim.fabric import Copier, Fabric, fair_rates
from pie_sim.links import byte_rates

from .conftest import DATA

TINY_HW = (DATA / "tiny-hw.toml").read_text()  # h2d 10, d2h 5, bidirectional 12 GB/s, 5 µs a call, host 20


def server(write, num_gpus=4, per_switch=2, uplink=None, host=20):
    text = TINY_HW.replace("num_gpus = 1", f"num_gpus = {num_gpus}").replace(
        "gpus_per_switch = 1", f"gpus_per_switch = {per_switch}").replace("bandwidth_gb_s = 20", f"bandwidth_gb_s = {host}")
    if uplink is not None:
        text += f"switch_uplink_gb_s = {uplink}\n"
    return load_hardware(write("server.toml", text))


def rates_of(fabric, routes):
    class Flow:
        def __init__(self, route, weight):
            self.route, self.weight = route, weight
    return fair_rates(fabric.capacity, [Flow(route, weight) for route, weight in routes])


def test_both_directions_of_one_link_follow_the_single_gpu_rule(write):
    hw = server(write, num_gpus=1, per_switch=1, host=1000)
    fabric = Fabric(simpy.Environment(), hw, 1)
    both = rates_of(fabric, [(fabric.path(0, H2D), 10e9), (fabric.path(0, D2H), 5e9)])
    expected = byte_rates(hw, {H2D, D2H})
    assert both == pytest.approx([expected[H2D], expected[D2H]], rel=1e-12)  # 8 and 4 GB/s


def test_two_gpus_behind_one_switch_share_its_uplink_and_others_do_not(write):
    fabric = Fabric(simpy.Environment(), server(write, uplink=12, host=1000), 4)
    rates = rates_of(fabric, [(fabric.path(gpu, H2D), 10e9) for gpu in (0, 1, 2)])
    assert rates == pytest.approx([6e9, 6e9, 10e9], rel=1e-12)  # GPUs 0 and 1: 12 / 2; GPU 2 alone: its link


def test_host_memory_caps_everything_and_a_gpu_to_gpu_copy_crosses_it_twice(write):
    fabric = Fabric(simpy.Environment(), server(write, per_switch=1, host=16), 4)
    rates = rates_of(fabric, [(fabric.path(gpu, H2D), 10e9) for gpu in range(4)])
    assert rates == pytest.approx([4e9] * 4, rel=1e-12)
    alone = rates_of(fabric, [(fabric.path(0, D2H) + fabric.path(1, H2D), 5e9)])
    assert alone == pytest.approx([5e9], rel=1e-12)  # host 16 / 2 = 8 > the sender's 5 GB/s


def test_a_flow_slowed_by_a_later_one_finishes_when_the_fluid_model_says(write):
    """GPUs 0 and 1 share a 12 GB/s uplink. 60 kB into GPU 0 from t=0 runs alone at 10 GB/s; at 2 µs
    (20 kB moved) 60 kB into GPU 1 starts and both run at 6 GB/s: GPU 0's last 40 kB take 6.67 µs; then
    GPU 1 runs alone at 10 GB/s for its last 20 kB."""
    env = simpy.Environment()
    fabric = Fabric(env, server(write, uplink=12, host=1000), 4)
    ends = {}

    def later():
        yield env.timeout(2e-6)
        fabric.move(60_000, fabric.path(1, H2D), 10e9, lambda: ends.setdefault(1, env.now))

    fabric.move(60_000, fabric.path(0, H2D), 10e9, lambda: ends.setdefault(0, env.now))
    env.process(later())
    env.run()
    first = 2e-6 + 40_000 / 6e9
    assert ends[0] == pytest.approx(first, rel=1e-9)
    assert ends[1] == pytest.approx(first + (60_000 - 6e9 * (first - 2e-6)) / 10e9, rel=1e-9)


def test_copies_of_one_stream_run_in_issue_order_after_their_latency_and_dependencies(write):
    """Two 50 kB prefetches on GPU 0's stream: the second starts when the first ends (5 µs + 5 µs each);
    a write-back ordered after the second starts only then, on the other stream."""
    env = simpy.Environment()
    copier = Copier(env, Fabric(env, server(write, per_switch=1, host=1000), 4))
    copier.issue(Copy(0, H2D, LAYER_KV, None, (), 50_000, 1), 0)
    copier.issue(Copy(1, H2D, LAYER_KV, None, (), 50_000, 1), 0)
    copier.issue(Copy(2, D2H, LAYER_KV, None, (), 50_000, 1, after=(1,)), 0)
    env.run()
    assert copier.spans[0] == pytest.approx((0.0, 10e-6), abs=1e-15)
    assert copier.spans[1] == pytest.approx((10e-6, 20e-6), abs=1e-15)
    assert copier.spans[2] == pytest.approx((20e-6, 20e-6 + 5e-6 + 50_000 / 5e9), abs=1e-15)
