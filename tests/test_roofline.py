"""The roofline's parts worked out by hand on the tiny system with every optional figure set, and the
catalog's defaults against what their fit prints."""
import pytest

from hwmodels import BatchShape, CostModel, load_hardware, load_model

from .conftest import DATA

# Round figures for the optional [gpu] fields, added to tests/data/tiny-hw.toml's.
EXTRA = """gemm_ridge_tokens = 10
elementwise_efficiency = 0.25
decode_attention_efficiency = 0.4
prefill_attention_efficiency = 0.1
iteration_overhead_us = 100
iteration_overhead_us_per_sequence = 2
"""


@pytest.fixture
def tiny(write):
    text = (DATA / "tiny-hw.toml").read_text().replace("layer_overhead_us = 10\n", "layer_overhead_us = 10\n" + EXTRA)
    return CostModel(load_hardware(write("full.toml", text)), load_model(DATA / "tiny-opt.toml"))


def test_a_decode_layer_by_hand(tiny):
    batch = BatchShape.of(decodes=[10])
    # GEMMs: 98,304 FLOP a token at 0.5 TFLOP/s x 1 / (1 + 10 ridge tokens) = 2.16269 µs > 102,016 B at 50 GB/s.
    gemm = 98304 * 11 / 0.5e12
    # Element-wise (OPT: no rotary, ReLU): (2 norms 4h + add 3h + ReLU 2f) x 2 B = (448 + 512) x 2 at 25 GB/s.
    elementwise = 1920 / 25e9
    # Decode attention: K,V of 11 positions read (2816 B) and the new token's (512 B) at 0.4 x 100 GB/s.
    attention = 3328 / 40e9
    assert tiny.roofline.gemm_time(1) == pytest.approx(gemm, rel=1e-12)
    assert tiny.roofline.elementwise_time(1) == pytest.approx(elementwise, rel=1e-12)
    assert tiny.layer_time(batch) == pytest.approx(gemm + elementwise + attention + 10e-6, rel=1e-12)


def test_prefill_attention_runs_at_its_own_share_of_peak(tiny):
    batch = BatchShape.of(prefills=[(128, 0)])
    flops = 4 * 64 * (128 * 129 // 2)           # QKᵀ and PV over the causal pairs
    assert tiny.roofline.attention_time(batch) == pytest.approx(flops / 0.1e12, rel=1e-12)
    mixed = BatchShape.of(prefills=[(128, 0)], decodes=[10])
    assert tiny.roofline.attention_time(mixed) == pytest.approx(flops / 0.1e12 + 3328 / 40e9, rel=1e-12)


def test_the_head_carries_the_engines_host_time(tiny):
    batch = BatchShape.of(decodes=[10, 20, 30])
    head = max(2 * 1000 * 64 * (3 + 10) / 0.5e12, (1000 * 64 + 3 * (64 + 1000)) * 2 / 50e9)
    assert tiny.head_time(batch) == pytest.approx(head + 100e-6 + 3 * 2e-6, rel=1e-12)


def test_copies_take_bandwidth_from_every_memory_bound_part(tiny):
    batch = BatchShape.of(decodes=[10] * 4)
    # 20 GB/s of copies at contention 0.5 take 10 GB/s from each part's rate: the GEMMs' weights and 4
    # tokens' activations (99,968 + 4 x 2,048 B) at 40 GB/s stay under their FLOPs (98,304 x 14 at 0.5 TFLOP/s).
    gemm = max(98304 * (4 + 10) / 0.5e12, (99968 + 4 * 2048) / 40e9)
    assert gemm == 98304 * 14 / 0.5e12
    by_hand = gemm + 4 * 1920 / 15e9 + 4 * 3328 / 30e9 + 10e-6
    assert tiny.layer_time(batch, copy_bandwidth=20e9) == pytest.approx(by_hand, rel=1e-12)
    with pytest.raises(ValueError, match="no HBM bandwidth"):
        tiny.layer_time(batch, copy_bandwidth=50e9)  # takes all of the element-wise kernels' 25 GB/s


def test_decode_time_is_iteration_time_bit_for_bit(tiny):
    for n, context in ((1, 5), (3, 60), (8, 100)):
        batch = BatchShape.of(decodes=[context] * n)
        assert tiny.decode_time(n, batch.attended_pairs, batch.padded_pairs) == tiny.iteration_time(batch)
    catalog = CostModel(load_hardware("h100-sxm-8x-nvlink"), load_model("llama-2-70b"), tp=4)
    batch = BatchShape.of(decodes=[700] * 64)
    assert catalog.decode_time(64, batch.attended_pairs, batch.padded_pairs) == catalog.iteration_time(batch)


def test_an_entry_without_the_optional_figures_prices_as_before():
    """No ridge, no element-wise work, attention at the GEMMs' shares, no host time: tests/data/tiny-hw.toml
    (test_costmodel.py has its by-hand figures)."""
    gpu = load_hardware(DATA / "tiny-hw.toml").gpu
    assert (gpu.gemm_ridge_tokens, gpu.elementwise_efficiency, gpu.decode_attention_efficiency,
            gpu.prefill_attention_efficiency, gpu.iteration_overhead, gpu.iteration_overhead_per_sequence) == \
        (0.0, None, None, None, 0.0, 0.0)
