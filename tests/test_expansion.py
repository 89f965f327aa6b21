"""The expansion controller against a closed-form plant: it settles at the largest stall-free CPU share
and backs off when the link's bandwidth halves."""
import pytest

from pie_policy.config import ConfigError
from pie_policy.expansion import ExpansionController
from pie_policy.plan import IterationStats

LAYERS, GPU_BLOCKS = 40, 1000
FIXED_S, PER_BLOCK_S = 200e-6, 0.1e-6   # per-layer compute: weights + attention over the batch's blocks
BLOCK_BYTES_LAYER = 327_680             # 16 tokens of OPT-13B, one layer


def plant(share: float, bandwidth: float) -> IterationStats:
    """Demand always exceeds the GPU, so the batch is G / (1 - share) blocks; each layer computes in
    FIXED + PER_BLOCK · blocks while its CPU share of blocks crosses the link; the GPU waits for the rest."""
    blocks = GPU_BLOCKS / (1 - share)
    compute = FIXED_S + PER_BLOCK_S * blocks
    transfer = share * blocks * BLOCK_BYTES_LAYER / bandwidth
    return IterationStats(0, 0.0, 0.0, LAYERS * compute, LAYERS * max(0.0, transfer - compute), 0, 0, 0, 0)


def stall_free_share(bandwidth: float) -> float:
    """Solve share · G · b / bw = FIXED (1 - share) + PER_BLOCK · G for share."""
    g_b = GPU_BLOCKS * BLOCK_BYTES_LAYER / bandwidth
    return (FIXED_S + PER_BLOCK_S * GPU_BLOCKS) / (g_b + FIXED_S)


def run(controller: ExpansionController, bandwidth: float, iterations: int) -> list[float]:
    # The plant applies the share at once: what is in use is the share.
    return [controller.observe(plant(controller.share, bandwidth), limited=True, in_use=controller.share)
            for _ in range(iterations)]


def test_settles_at_the_largest_stall_free_share_and_backs_off_when_bandwidth_halves():
    controller = ExpansionController()
    fast, slow = 345e9, 172.5e9
    best = stall_free_share(fast)
    assert 0.2 < best < 0.5  # the plant is set so the optimum lies inside (0, max_share)
    warmup = run(controller, fast, 60)
    trajectory = " ".join(f"{s:.3f}" for s in warmup)
    # Documented bound: best / step (0.02) iterations to get there, then a few back-offs to settle.
    reach = next(i for i, s in enumerate(warmup) if s >= best * (1 - controller.margin) - 0.005)
    assert reach <= best / 0.02 + 3, f"slow to expand (s*={best:.3f}): {trajectory}"
    settled = warmup[-20:]
    assert all(best * (1 - 2 * controller.margin) - 0.005 <= s <= best + 0.005 for s in settled), \
        f"did not settle at s*={best:.3f}: {trajectory}"
    # The GPU barely waits once settled: stalls are the small probes above s*.
    stall = sum(plant(s, fast).stall_s for s in settled) / sum(plant(s, fast).compute_s for s in settled)
    assert stall < 0.01, f"stall {stall:.2%} of compute once settled: {trajectory}"

    best_slow = stall_free_share(slow)
    after = run(controller, slow, 40)
    trajectory += " | bandwidth halved | " + " ".join(f"{s:.3f}" for s in after)
    assert after[0] < best_slow + 0.005, f"did not back off at once (s*={best_slow:.3f}): {trajectory}"
    assert all(best_slow * (1 - 2 * controller.margin) - 0.005 <= s <= best_slow + 0.005 for s in after[-20:]), \
        f"did not settle at the new s*={best_slow:.3f}: {trajectory}"


def test_holds_when_the_share_does_not_limit_the_batch():
    controller = ExpansionController(share=0.1)
    calm = IterationStats(0, 0.0, 1.0, 1.0, 0.0, 0, 0, 0, 0)
    assert controller.observe(calm, limited=False, in_use=0.1) == 0.1
    assert controller.observe(calm, limited=True, in_use=0.1) == pytest.approx(0.12)


def test_grows_back_faster_after_patience():
    controller = ExpansionController(share=0.0, step=0.01, patience=3)
    calm = IterationStats(0, 0.0, 1.0, 1.0, 0.0, 0, 0, 0, 0)
    shares = [controller.observe(calm, limited=True, in_use=controller.share) for _ in range(5)]
    assert shares == pytest.approx([0.01, 0.02, 0.03, 0.05, 0.07])


def test_waits_for_a_cut_to_take_effect_before_cutting_again():
    """Stalled iterations while the CPU still holds more than the share (blocks stay until their
    sequences finish) leave the share alone; the first stall with the share binding cuts it."""
    controller = ExpansionController(share=0.3)
    stalled = IterationStats(0, 0.0, 1.0, 1.0, 0.25, 0, 0, 0, 0)   # waited a quarter of compute
    assert controller.observe(stalled, limited=False, in_use=0.3) == pytest.approx(0.3 / 1.25 * 0.98)
    cut = controller.share
    assert controller.observe(stalled, limited=False, in_use=0.3) == cut  # still 0.3 in use: wait
    assert controller.observe(stalled, limited=False, in_use=cut) == pytest.approx(cut / 1.25 * 0.98)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_share=1.0), "max_share must be in \\[0, 1\\)"),
    (dict(share=-0.1), "share must be in \\[0, 1\\)"),
    (dict(step=0.5, max_step=0.1), "min_step <= step <= max_step"),
])
def test_bad_controller_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ExpansionController(**kwargs)
