"""The expansion controller against a closed-form plant: it converges from below on the share where the
link is busy (1 - margin) of compute, and cuts straight to the new one when the link's bandwidth halves."""
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
    return IterationStats(0, 0.0, 0.0, LAYERS * compute, LAYERS * max(0.0, transfer - compute),
                          int(LAYERS * share * blocks * BLOCK_BYTES_LAYER), 0, LAYERS * transfer, 0.0)


def settling_share(bandwidth: float, margin: float) -> float:
    """Where the link is busy (1 - margin) of compute: share · G · b / bw = (1 - margin) ·
    (FIXED (1 - share) + PER_BLOCK · G), solved for share (margin 0: the stall-free share s*)."""
    g_b = GPU_BLOCKS * BLOCK_BYTES_LAYER / bandwidth
    return (1 - margin) * (FIXED_S + PER_BLOCK_S * GPU_BLOCKS) / (g_b + (1 - margin) * FIXED_S)


def run(controller: ExpansionController, bandwidth: float, iterations: int) -> list[float]:
    # The plant applies the share at once: what is in use is the share.
    return [controller.observe(plant(controller.share, bandwidth), limited=True, in_use=controller.share)
            for _ in range(iterations)]


def test_converges_from_below_to_the_margin_point_and_cuts_once_when_bandwidth_halves():
    controller = ExpansionController()
    fast, slow = 345e9, 172.5e9
    best, settle = settling_share(fast, 0.0), settling_share(fast, controller.margin)
    assert 0.2 < settle < best < 0.5  # the plant is set so the optimum lies inside (0, max_share)
    warmup = run(controller, fast, 40)
    trajectory = " ".join(f"{s:.3f}" for s in warmup)
    # The estimate is low from below (compute grows with the batch): it never crosses s*, so never stalls.
    assert all(plant(s, fast).stall_s == 0 for s in warmup), f"stalled on the way up: {trajectory}"
    # At most max_step a step: settle / max_step steps, then a few to converge on the fixed point.
    reach = next(i for i, s in enumerate(warmup) if s >= settle - 0.001)
    assert reach <= settle / controller.max_step + 4, f"slow to expand (settle {settle:.3f}): {trajectory}"
    assert all(abs(s - settle) < 0.001 for s in warmup[-10:]), f"did not settle at {settle:.3f}: {trajectory}"

    stalled = plant(controller.share, slow)
    assert stalled.stall_s > 0
    after = run(controller, slow, 30)
    trajectory += " | bandwidth halved | " + " ".join(f"{s:.3f}" for s in after)
    # One cut, straight to the estimate; it is high from above, but only by the compute it saves.
    expected = controller.target(stalled, warmup[-1])
    assert after[0] == pytest.approx(expected) and after[0] < warmup[-1]
    # From there it holds inside the band: at or above the margin point, at or below the new s*.
    low, high = settling_share(slow, controller.margin), settling_share(slow, 0.0)
    assert all(low - 0.001 <= s <= high + 0.001 for s in after), f"not in [{low:.3f}, {high:.3f}]: {trajectory}"
    assert all(plant(s, slow).stall_s <= controller.tolerance * plant(s, slow).compute_s for s in after[1:])


def test_target_scales_the_cpu_blocks_by_compute_over_link_time():
    controller = ExpansionController(margin=0.0)
    # 20% of the KV on the CPU (x = 0.25) and the link busy half of compute: twice the CPU blocks fit.
    half = IterationStats(0, 0.0, 1.0, 1.0, 0.0, 1, 0, 0.5, 0.0)
    assert controller.target(half, 0.2) == pytest.approx(0.5 / 1.5)
    # Write-backs count as well: the busier direction bounds the share.
    assert controller.target(IterationStats(0, 0.0, 1.0, 1.0, 0.0, 1, 1, 0.25, 1.0), 0.2) == pytest.approx(0.2)
    # A stall beyond tolerance means the link needed at least compute + stall.
    stalled = IterationStats(0, 0.0, 1.0, 1.0, 0.25, 1, 0, 0.5, 0.0)
    assert controller.target(stalled, 0.2) == pytest.approx(0.2 / 1.2)  # x = 0.25 / 1.25
    assert controller.target(IterationStats(0, 0.0, 1.0, 1.0, 0.0, 0, 0, 0.0, 0.0), 0.2) is None


def test_cuts_only_to_the_target_and_holds_inside_the_band():
    controller = ExpansionController(share=0.3)
    stalled = IterationStats(0, 0.0, 1.0, 1.0, 0.25, 1, 0, 1.25, 0.0)   # waited a quarter of compute
    x = 0.3 / 0.7 * (1 - controller.margin) / 1.25
    assert controller.observe(stalled, limited=False, in_use=0.3) == pytest.approx(x / (1 + x))
    cut = controller.share
    # The same KV stalling again (its blocks are still on the CPU) gives the same target: no second cut.
    assert controller.observe(stalled, limited=False, in_use=0.3) == cut
    # A wait within tolerance (a prologue) and the link busy 97% of compute: inside the band, hold.
    busy = IterationStats(0, 0.0, 1.0, 1.0, 0.02, 1, 0, 0.97, 0.0)
    assert controller.observe(busy, limited=True, in_use=cut) == cut


def test_holds_when_the_share_does_not_limit_the_batch_and_probes_with_nothing_to_measure():
    controller = ExpansionController(share=0.1)
    calm = IterationStats(0, 0.0, 1.0, 1.0, 0.0, 0, 0, 0.0, 0.0)
    assert controller.observe(calm, limited=False, in_use=0.1) == 0.1
    assert controller.observe(calm, limited=True, in_use=0.0) == pytest.approx(0.1 + controller.step)
    idle_link = IterationStats(0, 0.0, 1.0, 1.0, 0.0, 1, 0, 0.01, 0.0)   # link nearly idle: big target
    assert controller.observe(idle_link, limited=True, in_use=0.1) == pytest.approx(0.12 + controller.max_step)


def test_holds_when_the_gpu_waited_with_no_kv_in_cpu_memory():
    """A stall with nothing on the CPU (a noisy host clock, a prefetch of blocks since freed) measures no
    link: the share holds (it used to raise TypeError comparing the share with no target)."""
    controller = ExpansionController(share=0.2)
    waited = IterationStats(0, 0.0, 1.0, 1.0, 0.5, 0, 0, 0.0, 0.0)
    assert controller.observe(waited, limited=True, in_use=0.0) == 0.2


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_share=1.0), "max_share must be in \\[0, 1\\)"),
    (dict(share=-0.1), "share must be in \\[0, 1\\)"),
    (dict(step=0.5, max_step=0.1), "step <= max_step"),
])
def test_bad_controller_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ExpansionController(**kwargs)
